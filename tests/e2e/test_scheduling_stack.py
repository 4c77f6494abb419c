"""Prefix caching, cache_salt, admission control and the engine's load stats through the whole stack."""
from __future__ import annotations

import asyncio

import grpc

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.test_batching_and_cancel import wait_all_blocks_free

SYSTEM = ("You are Tandem's test assistant. You answer in one short sentence, you never use lists, and you always "
          "stay polite and precise, whatever the user asks. ")


def ask(question: str, salt: str = "", priority: int = 0, max_tokens: int = 8) -> api.GenerateRequest:
    return api.GenerateRequest(
        chat=api.Chat(messages=[api.ChatMessage(role="system", content=SYSTEM),
                                api.ChatMessage(role="user", content=question)]),
        params=api.GenerationParams(max_tokens=max_tokens, temperature=0), cache_salt=salt, priority=priority)


def test_shared_system_prompt_is_served_from_the_cache(stack, api_stub, engine_stub):
    before = engine_stub.GetLoad(epb.EngineLoadRequest())
    first = api_stub.Generate(ask("What is the capital of Italy?", salt="e2e-cache"), timeout=120)
    second = api_stub.Generate(ask("What is the capital of Spain?", salt="e2e-cache"), timeout=120)
    again = api_stub.Generate(ask("What is the capital of Italy?", salt="e2e-cache"), timeout=120)
    other_tenant = api_stub.Generate(ask("What is the capital of Italy?", salt="e2e-other"), timeout=120)
    assert first.usage.cached_prompt_tokens == 0
    # The system prompt (about 50 tokens) is shared; whole 16-token blocks of it come from the cache.
    assert 32 <= second.usage.cached_prompt_tokens < second.usage.prompt_tokens
    assert again.usage.cached_prompt_tokens >= second.usage.cached_prompt_tokens
    assert again.token_ids == first.token_ids and again.text == first.text
    assert other_tenant.usage.cached_prompt_tokens == 0 and other_tenant.token_ids == first.token_ids
    load, _ = wait_all_blocks_free(engine_stub)
    assert load.prefix_cache_queries - before.prefix_cache_queries == sum(
        r.usage.prompt_tokens for r in (first, second, again, other_tenant))
    assert load.prefix_cache_hits - before.prefix_cache_hits == sum(
        r.usage.cached_prompt_tokens for r in (first, second, again, other_tenant))
    assert load.kv_blocks_cached > 0
    assert load.kv_blocks_used == 0 and load.kv_blocks_free + load.kv_blocks_cached == load.kv_blocks_total
    assert load.kv_integrity_checks > 0 and load.kv_integrity_failures == 0


def test_a_full_waiting_queue_gets_resource_exhausted(stack, api_stub, engine_stub):
    # The stack runs with --max-num-seqs 32 --max-waiting 24: a burst of 100 overflows the queue. The gateway's
    # default bound is what its engine queues (32 + 24 = 56); of the calls it lets through, those submitted
    # together faster than the engine schedules can still find the waiting queue full.
    async def burst():
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)

            async def one(i: int):
                try:
                    return await stub.Generate(ask(f"Count to {i}.", max_tokens=12), timeout=300)
                except grpc.aio.AioRpcError as e:
                    return e

            return await asyncio.gather(*[one(i) for i in range(100)])

    results = asyncio.run(burst())
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
    assert errors and served
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    gateway_full = "gateway at capacity: 56 requests in flight (max_in_flight 56)"
    assert all(gateway_full in e.details() or "waiting queue is full (24 requests)" in e.details() for e in errors)
    assert any(gateway_full in e.details() for e in errors)
    assert all(r.usage.completion_tokens == 12 for r in served)
    load, _ = wait_all_blocks_free(engine_stub)
    assert load.kv_blocks_used == 0 and load.num_waiting == 0
    assert api_stub.Generate(ask("Still there?", max_tokens=2), timeout=60).usage.completion_tokens == 2


def test_engine_reports_its_scheduling_settings(stack, engine_stub):
    info = engine_stub.GetInfo(epb.EngineInfoRequest())
    assert info.prefix_caching and info.max_num_seqs == 32 and info.max_waiting == 24
    assert info.max_num_batched_tokens == 2048      # the CPU default budget
