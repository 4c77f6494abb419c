"""Continuous batching and cancellation through the whole stack."""
from __future__ import annotations

import asyncio
import time

import grpc

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc

PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn Python is",
    "My favourite food is", "In 1969, the first man on the moon", "Water boils at", "A haiku about autumn:",
    "The three primary colors are", "import numpy as np\n", "Dear Sir or Madam,", "The quick brown fox",
    "To make a cup of tea,", "日本の首都は", "The largest planet in the solar system", "SELECT * FROM",
]


def greedy(prompt: str, max_tokens: int = 16) -> api.GenerateRequest:
    return api.GenerateRequest(prompt=prompt, params=api.GenerationParams(max_tokens=max_tokens, temperature=0))


async def _collect(stub, req) -> list[int]:
    return [t async for c in stub.GenerateStream(req, timeout=300) for t in c.token_ids]


def wait_all_blocks_free(engine_stub, timeout: float = 5.0) -> tuple[epb.EngineLoad, float]:
    start = time.monotonic()
    while True:
        load = engine_stub.GetLoad(epb.EngineLoadRequest(), timeout=5)
        elapsed = time.monotonic() - start
        if (load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0) or elapsed > timeout:
            return load, elapsed
        time.sleep(0.02)


def test_sixteen_concurrent_equal_one_by_one(stack, api_stub, engine_stub):
    one_by_one = [[t for c in api_stub.GenerateStream(greedy(p), timeout=120) for t in c.token_ids]
                  for p in PROMPTS]
    steps_before = engine_stub.GetLoad(epb.EngineLoadRequest()).steps

    async def concurrent():
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            return await asyncio.gather(*[_collect(stub, greedy(p)) for p in PROMPTS])

    together = asyncio.run(concurrent())
    steps = engine_stub.GetLoad(epb.EngineLoadRequest()).steps - steps_before
    assert together == one_by_one
    # They really shared steps: one by one would take at least 16 x 16 steps.
    assert steps < 16 * 16 / 2
    assert wait_all_blocks_free(engine_stub)[0].kv_blocks_used == 0


def test_cancel_mid_stream_frees_every_block(stack, engine_stub):
    async def cancel_after(n_chunks: int) -> None:
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            call = stub.GenerateStream(greedy("Once upon a time", max_tokens=2000))
            seen = 0
            async for _ in call:
                seen += 1
                if seen == n_chunks:
                    load = engine_stub.GetLoad(epb.EngineLoadRequest())
                    assert load.kv_blocks_used > 0 and load.num_running == 1
                    call.cancel()
                    break

    asyncio.run(cancel_after(5))
    load, elapsed = wait_all_blocks_free(engine_stub)
    assert load.kv_blocks_used == 0 and load.num_running == 0, load
    assert elapsed < 2.0


def test_deadline_aborts_in_engine(stack, api_stub, engine_stub):
    try:
        for _ in api_stub.GenerateStream(greedy("Once upon a time", max_tokens=2000), timeout=1.0):
            pass
        raise AssertionError("the deadline did not end the stream")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load, _ = wait_all_blocks_free(engine_stub)
    assert load.kv_blocks_used == 0 and load.num_running == 0, load
    # The stack still serves.
    assert list(api_stub.Generate(greedy("Hi", 2), timeout=60).token_ids)
