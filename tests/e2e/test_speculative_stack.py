"""Speculative decoding through the whole stack: `tandem serve --speculative-method ngram|draft` on SmolLM2 (the
draft is SmolLM2 itself) gives the session's plain stack's greedy tokens and text, streamed and unary, with
proposals accepted along the way, and leaves no KV block used.

One stack per method for the module."""
from __future__ import annotations

import grpc
import pytest

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import cpu_stack

# A prompt the output quotes (prompt lookup pays off) and one it does not.
PROMPTS = ["Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog",
           "The capital of France is"]
GREEDY = api.GenerationParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["ngram", "draft"])
def spec_stack(request, smollm2_gguf, tmp_path_factory):
    options = ["--speculative-method", request.param, "--num-speculative-tokens", "4"]
    if request.param == "draft":
        options += ["--draft-model", str(smollm2_gguf)]
    with cpu_stack(smollm2_gguf, tmp_path_factory.mktemp(f"spec-{request.param}") / "serve.log", options,
                   ["--num-kv-blocks", "256", "--max-num-seqs", "8", "--check-kv-integrity"]) as (stack, _):
        yield stack


def generate(address: str, prompt: str, stream: bool) -> tuple[list[int], str]:
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        req = api.GenerateRequest(prompt=prompt, params=GREEDY)
        if not stream:
            c = stub.Generate(req, timeout=300).completions[0]
            return list(c.token_ids), c.text
        ids, text = [], ""
        for chunk in stub.GenerateStream(req, timeout=300):   # n = 1: every message is the one completion's
            ids += chunk.token_ids
            text += chunk.text
        return ids, text


def engine_load(stack) -> epb.EngineLoad:
    with grpc.insecure_channel(stack.engine_address) as ch:
        return engine_pb2_grpc.EngineStub(ch).GetLoad(epb.EngineLoadRequest(), timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_output_equals_the_plain_stacks(stack, spec_stack, stream):
    for prompt in PROMPTS:
        expected = generate(stack.address, prompt, stream)
        assert len(expected[0]) == 24
        assert generate(spec_stack.address, prompt, stream) == expected, prompt
    load = engine_load(spec_stack)
    assert load.spec_decode_num_drafts > 0 and load.spec_decode_num_accepted_tokens > 0
    assert load.kv_blocks_used == 0 and load.kv_integrity_failures == 0
