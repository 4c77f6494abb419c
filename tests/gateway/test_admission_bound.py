"""The gateway's automatic admission bound: the sum over replicas of the engines' max_num_seqs + max_waiting, read
from their GetInfo (in-process fake engines over real gRPC), and an explicit --max-in-flight kept as given."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.admission import PROVISIONAL_MAX_IN_FLIGHT, Admission, engines_bound
from gateway.config import GatewayConfig, config_from_args
from gateway.pipeline import Pipeline
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2_grpc
from tests.gateway.test_pipeline_liveness import WAIT_S, FakeEngine, FakeTokenizer, serve, until


class SizedEngine(FakeEngine):
    """A fake engine whose GetInfo reports a queue capacity."""

    def __init__(self, max_num_seqs: int, max_waiting: int) -> None:
        super().__init__(running=0)
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting

    async def GetInfo(self, request, context):
        return epb.EngineInfo(model_name="fake", block_size=16, max_model_len=128, vocab_size=100,
                              max_num_seqs=self.max_num_seqs, max_waiting=self.max_waiting)


def test_engines_bound_sums_the_replicas_and_estimates_the_unknown_ones():
    assert engines_bound([64 + 1024]) == 1088
    assert engines_bound([64 + 1024, 8 + 16]) == 1112
    assert engines_bound([None, 24, None]) == 72          # replicas not heard from count as the first known one
    assert engines_bound([None, None]) is None
    assert engines_bound([0]) is None                     # an engine that reports no capacity


def test_automatic_bound_follows_the_engines_and_an_explicit_one_is_kept():
    auto = Admission(None, 1000)
    assert auto.automatic and auto.max_in_flight == PROVISIONAL_MAX_IN_FLIGHT
    auto.follow_engines(None)
    assert auto.max_in_flight == PROVISIONAL_MAX_IN_FLIGHT
    auto.follow_engines(1112)
    assert auto.max_in_flight == 1112
    explicit = Admission(7, 1000)
    explicit.follow_engines(1112)
    assert not explicit.automatic and explicit.max_in_flight == 7


def test_the_bound_refuses_exactly_past_the_engines_capacity():
    async def main():
        admission = Admission(None, 1000)
        admission.follow_engines(3)
        entries = [admission.enter() for _ in range(3)]
        code, message, trailers = admission.refusal(limited=True)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight 3" in message
        admission.leave(entries.pop())
        assert admission.refusal(limited=True) is None
        assert admission.refusal(limited=True, needed=2) is not None
    asyncio.run(main())


def test_the_flag_defaults_to_automatic_and_an_explicit_value_wins():
    assert config_from_args([]).max_in_flight is None
    assert config_from_args(["--max-in-flight", "9"]).max_in_flight == 9
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        GatewayConfig(max_in_flight=0)


async def _pipeline_scenario() -> None:
    add_engine = engine_pb2_grpc.add_EngineServicer_to_server
    tok_server, tok_port = await serve(FakeTokenizer(), tokenizer_pb2_grpc.add_TokenizerServicer_to_server)
    (a, a_port), (b, b_port) = await serve(SizedEngine(64, 1024), add_engine), await serve(SizedEngine(64, 1024),
                                                                                         add_engine)
    config = GatewayConfig(engine=f"127.0.0.1:{a_port},127.0.0.1:{b_port}", tokenizer=f"127.0.0.1:{tok_port}",
                           connect_timeout_s=WAIT_S)
    auto, explicit = Admission(config.max_in_flight, 1000), Admission(300, 1000)
    pipeline = Pipeline(config)
    pipeline.capacity_observer = lambda bound: (auto.follow_engines(bound), explicit.follow_engines(bound))
    try:
        await pipeline.start()
        ra, rb = pipeline.replicas
        assert await until(lambda: ra.live and rb.live)
        assert auto.max_in_flight == 2 * (64 + 1024) and explicit.max_in_flight == 300
        await b.stop(0)
        assert await until(lambda: not rb.live)
        b, _ = await serve(SizedEngine(8, 16), add_engine, b_port)   # B restarts with a smaller queue
        assert await until(lambda: rb.live)
        assert rb.info.max_num_seqs == 8
        assert auto.max_in_flight == (64 + 1024) + (8 + 16) and explicit.max_in_flight == 300
    finally:
        await pipeline.close()
        await a.stop(0)
        await b.stop(0)
        await tok_server.stop(0)


def test_the_pipeline_reports_the_replicas_capacity_as_they_come_up():
    asyncio.run(_pipeline_scenario())
