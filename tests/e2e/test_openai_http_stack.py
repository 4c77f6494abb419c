"""The real `openai` Python client against `tandem serve` on SmolLM2 (the session stack's HTTP port): completions and
chat, whole and streamed, equal to the gRPC API for the same request; n = 2, logprobs, echo, stop strings; usage
in the last chunk; a bad parameter named as gRPC names it; a closed stream frees the engine's KV blocks; the
README's `curl -N` example; /v1/models, /health, /metrics and the request log."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api
from tests.e2e.test_batching_and_cancel import wait_all_blocks_free

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0, timeout=120)


def grpc_whole(api_stub, params: api.GenerationParams, prompt: str | None = PROMPT, chat=None,
               cache_salt: str = "") -> api.GenerateResponse:
    if chat is not None:
        req = api.GenerateRequest(chat=api.Chat(messages=[api.ChatMessage(**m) for m in chat]), params=params,
                                  cache_salt=cache_salt)
    else:
        req = api.GenerateRequest(prompt=prompt, params=params, cache_salt=cache_salt)
    return api_stub.Generate(req, timeout=120)


def test_completions_whole_and_streamed_equal_the_grpc_api(client, api_stub):
    reference = grpc_whole(api_stub, api.GenerationParams(max_tokens=8, temperature=0))
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.choices[0].text == reference.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (reference.usage.prompt_tokens, 8)
    assert whole.usage.total_tokens == reference.usage.prompt_tokens + 8 and whole.object == "text_completion"

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == reference.usage.prompt_tokens


def test_chat_whole_and_streamed_equal_the_grpc_api(client, api_stub):
    reference = grpc_whole(api_stub, api.GenerationParams(max_tokens=8, temperature=0), chat=CHAT)
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0)
    assert whole.choices[0].message.content == reference.text and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == reference.usage.prompt_tokens and whole.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and "".join(d.content for d in deltas) == reference.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_n_2_sampled_with_a_seed_equals_the_grpc_api(client, api_stub):
    # Salted apart: neither request reads the other's prefix-cache blocks, so both compute the same numbers.
    params = api.GenerationParams(max_tokens=6, temperature=0.9, seed=11, n=2)
    reference = grpc_whole(api_stub, params, cache_salt="grpc-n2")
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.9, seed=11, n=2,
                                      extra_body={"cache_salt": "http-n2"})
    assert [c.index for c in whole.choices] == [0, 1]
    assert [c.text for c in whole.choices] == [c.text for c in reference.completions]
    assert whole.usage.completion_tokens == reference.usage.completion_tokens
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.9, seed=11,
                                           n=2, stream=True, extra_body={"cache_salt": "http-n2-stream"}):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert [streamed[0], streamed[1]] == [c.text for c in reference.completions]


def test_logprobs_and_top_logprobs_equal_the_grpc_api(client, api_stub):
    reference = grpc_whole(api_stub, api.GenerationParams(max_tokens=6, temperature=0, logprobs=3), chat=CHAT)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == [e.token for e in reference.completions[0].logprobs]
    for got, want in zip(content, reference.completions[0].logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [(t.token, round(t.logprob, 5)) for t in got.top_logprobs] == \
            [(t.token, round(t.logprob, 5)) for t in want.top]
        assert bytes(got.bytes).decode() == got.token

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    lp = echoed.choices[0].logprobs
    prompt_tokens = echoed.usage.prompt_tokens
    assert echoed.choices[0].text.startswith(PROMPT) and len(lp.tokens) == prompt_tokens + 4
    assert "".join(lp.tokens[:prompt_tokens]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    # Greedy: each output token is its position's most likely one.
    for token, top in zip(lp.tokens[prompt_tokens:], lp.top_logprobs[prompt_tokens:]):
        assert token == max(top, key=top.get)


def test_stop_strings_end_the_text_as_in_the_grpc_api(client, api_stub):
    reference = grpc_whole(api_stub, api.GenerationParams(max_tokens=12, temperature=0, stop=["answer", "zz"]))
    assert reference.finish_reason == api.FINISH_REASON_STOP and reference.stop_string == "answer"
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      stop=["answer", "zz"])
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == (reference.text, "stop") and "answer" not in choice.text
    assert choice.model_extra["stop_reason"] == "answer"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                              stop="answer", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reference.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_several_prompts_in_one_call(client, api_stub):
    prompts = [PROMPT, "One, two, three,"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in whole.choices] == [0, 1]
    for prompt, choice in zip(prompts, whole.choices):
        assert choice.text == grpc_whole(api_stub, api.GenerationParams(max_tokens=3, temperature=0), prompt).text


def test_a_bad_parameter_is_named_as_the_grpc_api_names_it(client, api_stub):
    with pytest.raises(grpc.RpcError) as grpc_err:
        grpc_whole(api_stub, api.GenerationParams(top_p=1.5))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, top_p=1.5)
    assert err.value.status_code == 400 and err.value.body["param"] == "top_p"
    assert err.value.body["message"] == grpc_err.value.details().removeprefix("params.")
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens: must be >= 1, got 0"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=0)
    with pytest.raises(openai.BadRequestError, match="^Error code: 400 - messages: 9[0-9]{3} tokens do not fit"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 9000}])
    with pytest.raises(openai.BadRequestError, match="temprature: not a parameter"):
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"temprature": 0})
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert not_found.value.body["param"] == "model" and "'gpt-4o' is not loaded" in not_found.value.body["message"]


def test_a_closed_stream_frees_every_kv_block_within_2_s(client, engine_stub):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            load = engine_stub.GetLoad(epb.EngineLoadRequest(), timeout=5)
            assert load.kv_blocks_used > 0 and load.num_running == 1
            stream.close()
            break
    load, elapsed = wait_all_blocks_free(engine_stub)
    assert load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0, load
    assert elapsed < 2.0


def test_the_readme_curl_example_streams_server_sent_events(stack):
    block = re.search(r"```bash\n(curl -N [^`]*?)```", README.read_text())
    assert block, "the README shows a `curl -N` chat completion"
    port = stack.http_url.split(":")[-1].split("/")[0]
    command = block.group(1).replace("localhost:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_metrics_and_the_request_log(stack, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = stack.http_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                              extra_headers={"x-request-id": "http-log-check"})
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert re.search(r'^tandem:request_success_total\{finished_reason="length".*\} [1-9]', metrics, re.M)
    line = re.compile(r"finish request_id=http-log-check method=POST /v1/completions .*output_tokens=2")
    deadline = time.monotonic() + 10   # the launcher relays the gateway's output: wait for it, within a bound
    while not line.search(stack.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line.search(stack.log.read_text()), stack.log.read_text()[-2000:]
