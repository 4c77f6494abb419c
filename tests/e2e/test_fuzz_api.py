"""Random valid and invalid calls (benchmarks/request_fuzz.py) against the session stack: each ends with OK or a
precise client error, never INTERNAL, UNKNOWN, UNAVAILABLE or a hang; raw bytes that are not a GenerateRequest
get INVALID_ARGUMENT; afterwards the stack answers a greedy request as before, holds no KV block once idle, and
its KV integrity checks found nothing. Plus the fixed cases behind what the fuzzer and `tandem bench soak` found:
greedy by other means, beam search's length_penalty extremes, request ids shaped like another call's outputs."""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st

from benchmarks.request_fuzz import RAW_FORMS, RequestFuzzer, check_response, multi_callable
from benchmarks.soak_workload import GREEDY_WAYS, integrity_request
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc

CALL_TIMEOUT_S = 120   # a case still running after this long is a hang: the cases are cheap (max_tokens <= 8)

# Hypothesis draws seeds of the fuzzer (random.Random(seed) replays a case). No shrinking: a seed does not shrink
# into a simpler case, and each try would be another call against the stack; the failing case is printed whole.
SEEDS = st.integers(min_value=0, max_value=2**64 - 1)
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _reference(api_stub) -> list[int]:
    return list(api_stub.Generate(integrity_request("The capital of France is", 8), timeout=CALL_TIMEOUT_S).token_ids)


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def fuzzer(api_stub) -> RequestFuzzer:
    return RequestFuzzer(api_stub.GetModelInfo(api.GetModelInfoRequest(), timeout=30).vocab_size)


@pytest.fixture(scope="module")
def before(api_stub, engine_stub) -> tuple[list[int], int]:
    """The reference output and the engine's integrity failures, before any fuzzing."""
    return _reference(api_stub), engine_stub.GetLoad(epb.EngineLoadRequest(), timeout=10).kv_integrity_failures


def _send(channel, case, vocab_size: int) -> None:
    call = multi_callable(channel, case.method)
    try:
        answer = call(case.payload(), timeout=CALL_TIMEOUT_S)
        messages = [answer] if case.method == "Generate" else list(answer)
    except grpc.RpcError as err:
        event(err.code().name)   # shown by --hypothesis-show-statistics
        assert err.code() in case.expected, f"{err.code().name}: {err.details()}\nfor {case.describe()}"
        return
    event("OK")
    assert grpc.StatusCode.OK in case.expected, f"OK for {case.describe()}"
    problems = check_response(case.method, case.request, messages, vocab_size)
    assert not problems, f"{problems}\nfor {case.describe()}"


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("why", RAW_FORMS)
def test_bytes_that_are_not_a_request_get_invalid_argument(before, channel, fuzzer, method, why):
    raw, _ = fuzzer.raw_bytes(random.Random(why), why)
    with pytest.raises(grpc.RpcError) as info:
        answer = multi_callable(channel, method)(raw, timeout=CALL_TIMEOUT_S)
        if method == "GenerateStream":
            list(answer)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (why, raw, info.value.details())


@FUZZ_SETTINGS
@given(seed=SEEDS)
def test_random_request_ends_with_a_precise_status(before, channel, fuzzer, seed):
    _send(channel, fuzzer.case(random.Random(seed), raw_share=0.0), fuzzer.vocab_size)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(seed=SEEDS)
def test_random_bytes_get_invalid_argument(before, channel, fuzzer, seed):
    _send(channel, fuzzer.case(random.Random(seed), raw_share=1.0), fuzzer.vocab_size)


@pytest.mark.parametrize("greedy", sorted(GREEDY_WAYS))
def test_every_way_to_greedy_gives_the_greedy_output(api_stub, greedy):
    """A denormal temperature or sampling from the top 1 picks the most likely token, as temperature 0 does."""
    def run(way: str) -> list[int]:
        return list(api_stub.Generate(integrity_request("The capital of France is", 8, greedy=way),
                                      timeout=CALL_TIMEOUT_S).token_ids)

    assert run(greedy) == run("temperature 0")


@pytest.mark.parametrize("length_penalty", [-10.0, -5.0, 0.0, 10.0])
def test_beam_search_ends_for_every_length_penalty_in_range(api_stub, length_penalty):
    """Over 16 tokens, a length_penalty of -5 pushes the best live beam's score below the search's stand-in for
    an impossible score: the search must still end with its outputs."""
    req = api.GenerateRequest(prompt="The capital of France is", params=api.GenerationParams(
        max_tokens=16, use_beam_search=True, beam_width=2, n=2, length_penalty=length_penalty))
    resp = api_stub.Generate(req, timeout=CALL_TIMEOUT_S)
    assert len(resp.completions) == 2 and all(c.token_ids and c.finish_reason for c in resp.completions), resp


def test_request_ids_shaped_like_another_calls_outputs(stack):
    """Calls in flight together under the client request ids "x" (n=2) and "x#0": each ends with its own tokens
    (the second may be refused)."""
    alone = api.GenerateRequest(prompt="The capital of France is", request_id="x", params=api.GenerationParams(
        max_tokens=12, temperature=0, ignore_eos=True, n=2))
    other = api.GenerateRequest(prompt="Once upon a time", request_id="x#0", params=api.GenerationParams(
        max_tokens=12, temperature=0, ignore_eos=True))

    async def run() -> tuple:
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            want = [list((await stub.Generate(r, timeout=CALL_TIMEOUT_S)).completions[0].token_ids)
                    for r in (alone, other)]
            got = await asyncio.gather(stub.Generate(alone, timeout=CALL_TIMEOUT_S),
                                       stub.Generate(other, timeout=CALL_TIMEOUT_S), return_exceptions=True)
            return want, got

    (want_alone, want_other), (got_alone, got_other) = asyncio.run(run())
    assert not isinstance(got_alone, Exception), got_alone
    assert [list(c.token_ids) for c in got_alone.completions] == [want_alone] * 2
    if isinstance(got_other, grpc.aio.AioRpcError):
        assert got_other.code() == grpc.StatusCode.INVALID_ARGUMENT, got_other
    else:
        assert not isinstance(got_other, Exception), got_other
        assert list(got_other.token_ids) == want_other


def test_stack_unharmed_after_fuzzing(before, api_stub, engine_stub):
    reference, failures_before = before
    assert _reference(api_stub) == reference
    deadline = time.monotonic() + 10
    while True:
        load = engine_stub.GetLoad(epb.EngineLoadRequest(), timeout=10)
        idle = load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_used == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, load
    assert load.kv_integrity_failures == failures_before, load
