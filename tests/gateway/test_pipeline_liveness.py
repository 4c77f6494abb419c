"""Replica liveness in the pipeline against in-process fake engines and a fake tokenizer (real gRPC, no model):
both replicas come up, a stopped one is marked down while the other stays up, no live replica routes nowhere,
and a restarted one is marked up again."""
from __future__ import annotations

import asyncio

import grpc

from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline, Submission
from gateway.router import ReplicaLoad
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc

WAIT_S = 10.0   # a bound on waiting for the poller, not a speed claim


class FakeEngine(engine_pb2_grpc.EngineServicer):
    def __init__(self, running: int) -> None:
        self.running = running

    async def GetInfo(self, request, context):
        return epb.EngineInfo(model_name="fake", block_size=16, max_model_len=128, vocab_size=100)

    async def GetLoad(self, request, context):
        return epb.EngineLoad(num_running=self.running, kv_blocks_total=10, kv_blocks_used=self.running)

    async def Session(self, request_iterator, context):
        async for _ in request_iterator:   # accepts work, never answers: requests stay in flight
            pass
        yield epb.StepOutput()


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def GetInfo(self, request, context):
        return tpb.TokenizerInfo()

    async def Detokenize(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        yield tpb.DetokenizeOutput()


async def serve(servicer, add, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def until(predicate) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return predicate()


async def scenario() -> None:
    add_engine = engine_pb2_grpc.add_EngineServicer_to_server
    tok_server, tok_port = await serve(FakeTokenizer(), tokenizer_pb2_grpc.add_TokenizerServicer_to_server)
    (a, a_port), (b, b_port) = await serve(FakeEngine(3), add_engine), await serve(FakeEngine(0), add_engine)
    config = GatewayConfig(engine=f"127.0.0.1:{a_port},127.0.0.1:{b_port}", tokenizer=f"127.0.0.1:{tok_port}",
                           connect_timeout_s=WAIT_S)
    pipeline = Pipeline(config)
    try:
        await pipeline.start()
        ra, rb = pipeline.replicas
        assert await until(lambda: ra.live and rb.live)
        assert pipeline.engine_info.model_name == "fake"
        assert await until(lambda: ra.load.num_running == 3)
        assert Pipeline._load_of(ra) == ReplicaLoad(ra.name, live=True, in_flight=0, others=3, kv_usage=0.3)

        params = epb.SamplingParams(max_tokens=4)
        x, y, z = (pipeline.submit(Submission(rid, list(range(k, k + 40)), params))
                   for k, rid in ((0, "x"), (100, "y"), (200, "z")))
        # A's score is 3 others + 0.3 KV usage; B's is its in-flight count: B takes requests until it passes 3.3.
        assert [h.replica for h in (x, y, z)] == [rb.name] * 3
        w = pipeline.submit(Submission("w", list(range(300, 340)), params))
        assert w.replica == rb.name                                        # B = 3 < 3.3
        v = pipeline.submit(Submission("v", list(range(400, 440)), params))
        assert v.replica == ra.name                                        # B = 4 > 3.3
        assert pipeline.num_in_flight == 5

        await b.stop(0)
        assert await until(lambda: not rb.live)
        for handle in (x, y, z, w):
            failure = await asyncio.wait_for(handle.queue.get(), WAIT_S)
            assert failure.code == grpc.StatusCode.UNAVAILABLE and rb.name in failure.message
        assert v.queue.empty() and pipeline.num_in_flight == 1            # A's request is untouched
        pipeline.cancel("v")
        assert pipeline.num_in_flight == 0
        assert ra.live and [r.name for r in pipeline.live_replicas()] == [ra.name]
        assert pipeline.router.choose([Pipeline._load_of(r) for r in pipeline.replicas], []) == ra.name

        await a.stop(0)
        assert await until(lambda: not ra.live)
        assert pipeline.router.choose([Pipeline._load_of(r) for r in pipeline.replicas], []) is None

        b, _ = await serve(FakeEngine(0), add_engine, b_port)
        assert await until(lambda: rb.live)
        assert not ra.live
        await b.stop(0)
    finally:
        await pipeline.close()
        await tok_server.stop(0)


def test_replicas_go_down_and_come_back():
    asyncio.run(scenario())
