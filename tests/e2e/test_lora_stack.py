"""LoRA adapters through the whole stack (`tandem serve`) on a tiny random Llama with the default model's tokenizer:
one adapter loaded at start (--lora), one over tandem.v1.Admin (with grpcurl, by reflection); generations on
adapters and on the base model in the same batch, each equal to transformers with that adapter merged into the
weights; NOT_FOUND, INVALID_ARGUMENT and ALREADY_EXISTS; and an unload under traffic: the streams on the adapter
run to their end with the adapter's tokens, the unload answers once they have, and every KV block comes back."""
from __future__ import annotations

import asyncio
import json

import grpc
import openai
import pytest
import torch

from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc
from protos.tandem.v1 import admin_pb2 as admin
from protos.tandem.v1 import admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import free_port, serve_process
from tests.e2e.test_batching_and_cancel import wait_all_blocks_free
from tests.e2e.test_grpcurl import run as grpcurl
from tests.engine.lora_files import MLP, hf_merged, write_lora_adapter
from tests.engine.tiny_models import write_tiny_llama

PROMPT = "The capital of France is"
TOKENS = 40


@pytest.fixture(scope="module")
def files(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-stack")
    base = write_tiny_llama(root / "base", seed=21, vocab_size=49152)   # the default tokenizer's ids fit
    return {"base": base,
            "pre": write_lora_adapter(base, root / "pre", r=8, alpha=16, targets=("q_proj", "v_proj") + MLP, seed=4),
            "a": write_lora_adapter(base, root / "a", r=4, alpha=8, targets=("q_proj", "k_proj", "o_proj"), seed=5),
            "big": write_lora_adapter(base, root / "big", r=32, alpha=32, seed=6)}


@pytest.fixture(scope="module")
def lora_stack(files, smollm2_gguf, tmp_path_factory):
    ports = [free_port() for _ in range(4)]
    log = tmp_path_factory.mktemp("lora-stack-log") / "serve.log"
    address = f"127.0.0.1:{ports[0]}"
    args = ["--model", str(files["base"]), "--tokenizer-model", str(smollm2_gguf), "--host", "127.0.0.1",
            "--port", str(ports[0]), "--tokenizer-port", str(ports[1]), "--engine-port", str(ports[2]),
            "--device", "cpu", "--dtype", "float32", "--metrics-port", "0", "--http-port", str(ports[3]),
            "--lora", f"pre={files['pre']}",
            "--", "--max-loras", "2", "--max-lora-rank", "16", "--num-kv-blocks", "256", "--max-num-seqs", "16",
            "--check-kv-integrity", "--async-scheduling"]
    with serve_process(args, address, log):
        yield {"address": address, "engine": f"127.0.0.1:{ports[2]}", "tokenizer": f"127.0.0.1:{ports[1]}",
               "http": f"http://127.0.0.1:{ports[3]}/v1"}


@pytest.fixture(scope="module")
def expected(files, lora_stack):
    """adapter (None: the base model) -> the greedy tokens of transformers with it merged in."""
    with grpc.insecure_channel(lora_stack["tokenizer"]) as ch:
        prompt = list(tokenizer_pb2_grpc.TokenizerStub(ch).Encode(tpb.EncodeRequest(text=PROMPT)).token_ids)
    out = {}
    for adapter in (None, "pre", "a"):
        model = hf_merged(files["base"], files[adapter] if adapter else None)
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        out[adapter] = seq[len(prompt):]
    assert len({tuple(v) for v in out.values()}) == 3     # each adapter changes the tokens
    return out


def request(adapter: str = "", max_tokens: int = TOKENS) -> api.GenerateRequest:
    return api.GenerateRequest(prompt=PROMPT, adapter=adapter, params=api.GenerationParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def stream(stub, req, first_chunk: asyncio.Event | None = None) -> tuple[list[int], int]:
    tokens, finish = [], 0
    async for chunk in stub.GenerateStream(req, timeout=120):
        tokens += chunk.token_ids
        finish = chunk.finish_reason or finish
        if first_chunk is not None:
            first_chunk.set()
    return tokens, finish


def test_load_over_grpcurl_list_and_generate_in_one_batch_with_the_base_model(lora_stack, files, expected):
    address = lora_stack["address"]
    assert "tandem.v1.Admin" in grpcurl(address, "list").split()
    loaded = json.loads(grpcurl("-d", json.dumps({"name": "a", "path": str(files["a"])}), address,
                                "tandem.v1.Admin/LoadAdapter"))
    assert (loaded["name"], loaded["rank"], loaded["alpha"]) == ("a", 4, 8)
    assert sorted(loaded["target_modules"]) == ["k_proj", "o_proj", "q_proj"]
    with grpc.insecure_channel(address) as ch:
        listed = admin_pb2_grpc.AdminStub(ch).ListAdapters(admin.ListAdaptersRequest(), timeout=30)
    assert [(a.name, a.rank, a.unloading, a.num_requests) for a in listed.adapters] == [("a", 4, False, 0),
                                                                                      ("pre", 8, False, 0)]

    async def together():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            base_started = asyncio.Event()
            base = asyncio.ensure_future(stream(stub, request(max_tokens=200), base_started))
            await base_started.wait()              # the base request is running: the others join its batch
            results = await asyncio.gather(*[stream(stub, request(a)) for a in ("a", "pre", "", "a")])
            base_done_before = base.done()
            return results, await base, base_done_before

    results, base, base_done_before = asyncio.run(together())
    assert not base_done_before                    # it ran through every step of the others
    for adapter, (tokens, finish) in zip(("a", "pre", None, "a"), results):
        assert tokens == expected[adapter] and finish == api.FINISH_REASON_LENGTH, adapter
    assert base[0][:TOKENS] == expected[None] and len(base[0]) == 200


def test_statuses_for_unknown_invalid_and_taken(lora_stack, files):
    with grpc.insecure_channel(lora_stack["address"]) as ch:
        gen, adm = generation_pb2_grpc.GenerationStub(ch), admin_pb2_grpc.AdminStub(ch)
        cases = [
            (lambda: gen.Generate(request("nope"), timeout=30), grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"),
            (lambda: adm.LoadAdapter(admin.LoadAdapterRequest(name="big", path=str(files["big"])), timeout=30),
             grpc.StatusCode.INVALID_ARGUMENT, "rank 32 exceeds max_lora_rank 16"),
            (lambda: adm.LoadAdapter(admin.LoadAdapterRequest(name="x", path="/no/such/dir"), timeout=30),
             grpc.StatusCode.INVALID_ARGUMENT, "is not a directory"),
            (lambda: adm.LoadAdapter(admin.LoadAdapterRequest(name="pre", path=str(files["a"])), timeout=30),
             grpc.StatusCode.ALREADY_EXISTS, "'pre' is already loaded"),
            (lambda: adm.UnloadAdapter(admin.UnloadAdapterRequest(name="nope"), timeout=30),
             grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"),
        ]
        for call, code, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and message in err.value.details(), err.value.details()
        assert [a.name for a in adm.ListAdapters(admin.ListAdaptersRequest(), timeout=30).adapters] == ["a", "pre"]


def test_the_http_apis_model_field_picks_the_adapter(lora_stack, expected):
    client = openai.OpenAI(base_url=lora_stack["http"], api_key="unused", max_retries=0, timeout=120)
    cards = {m.id: m.model_extra["parent"] for m in client.models.list().data}
    base = next(name for name, parent in cards.items() if parent is None)
    assert cards == {base: None, "a": base, "pre": base}   # "a" was loaded over tandem.v1.Admin above
    for model, adapter in ((base, None), ("pre", "pre"), ("a", "a")):
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].model_extra["token_ids"] == expected[adapter], model
    with pytest.raises(openai.NotFoundError, match="model: 'nope' is not loaded"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_unload_under_traffic_drains_the_streams_and_frees_every_block(lora_stack, expected):
    address = lora_stack["address"]

    async def scenario():
        async with grpc.aio.insecure_channel(address) as ch:
            stub, adm = generation_pb2_grpc.GenerationStub(ch), admin_pb2_grpc.AdminStub(ch)
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.ensure_future(stream(stub, request(a), e))
                       for a, e in zip(("a", "a", "a", "pre"), started)]
            for e in started:
                await e.wait()
            unload = asyncio.ensure_future(adm.UnloadAdapter(admin.UnloadAdapterRequest(name="a"), timeout=120))
            while True:                            # the unload has reached the engine: "a" refuses new requests
                listed = {x.name: x for x in (await adm.ListAdapters(admin.ListAdaptersRequest())).adapters}
                if "a" not in listed or listed["a"].unloading:
                    break
            try:
                await stub.Generate(request("a"), timeout=30)
                late = None
            except grpc.aio.AioRpcError as e:
                late = (e.code(), e.details())
            return await asyncio.gather(*streams), await unload, late

    results, unloaded, late = asyncio.run(scenario())
    for adapter, (tokens, finish) in zip(("a", "a", "a", "pre"), results):
        assert tokens == expected[adapter] and finish == api.FINISH_REASON_LENGTH, adapter
    assert (unloaded.name, unloaded.num_drained_requests) == ("a", 3)
    assert late is not None and late[0] == grpc.StatusCode.NOT_FOUND and "'a' is" in late[1]
    with grpc.insecure_channel(address) as ch:
        adm = admin_pb2_grpc.AdminStub(ch)
        assert [x.name for x in adm.ListAdapters(admin.ListAdaptersRequest(), timeout=30).adapters] == ["pre"]
        with pytest.raises(grpc.RpcError) as err:
            generation_pb2_grpc.GenerationStub(ch).Generate(request("a"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(lora_stack["engine"]) as ch:
        engine = engine_pb2_grpc.EngineStub(ch)
        load, _ = wait_all_blocks_free(engine)
        assert load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0, load
        assert load.kv_integrity_checks > 0 and load.kv_integrity_failures == 0, load
