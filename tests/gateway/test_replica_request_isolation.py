"""One request's failure on a replica's shared streams ends that request alone with INTERNAL: an engine FAILED
delta, a tokenizer result carrying an error, and an exception raised while the gateway handles one request's
output. The streams stay open and the other requests finish (in-process fake engine and tokenizer, real gRPC)."""
from __future__ import annotations

import asyncio

import grpc

import gateway.replica
from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline, Submission
from gateway.request_handle import Chunk, Failure
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc
from tests.gateway.test_pipeline_liveness import serve


class AnsweringEngine(engine_pb2_grpc.EngineServicer):
    """Answers each submit at once: two tokens and the end, or FAILED for ids starting with 'engine-fail'."""

    async def GetInfo(self, request, context):
        return epb.EngineInfo(model_name="fake", block_size=16, max_model_len=128, vocab_size=100)

    async def GetLoad(self, request, context):
        return epb.EngineLoad(kv_blocks_total=10)

    async def Session(self, request_iterator, context):
        async for msg in request_iterator:
            for s in msg.submits:
                if s.request_id.startswith("engine-fail"):
                    d = epb.RequestDelta(request_id=s.request_id, finish=epb.ENGINE_FINISH_FAILED,
                                         error="ValueError: planted", last=True)
                else:
                    d = epb.RequestDelta(request_id=s.request_id, token_ids=[5, 6], finish=epb.ENGINE_FINISH_LENGTH,
                                         last=True, logprobs=[epb.TokenLogprobs(token_id=5), epb.TokenLogprobs(token_id=6)])
                yield epb.StepOutput(deltas=[d])


class EchoTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    """Each step's text is 'ab'; a request whose id starts with 'detok-fail' gets an error result."""

    async def GetInfo(self, request, context):
        return tpb.TokenizerInfo()

    async def Detokenize(self, request_iterator, context):
        async for msg in request_iterator:
            out = tpb.DetokenizeOutput()
            for s in msg.steps:
                if s.request_id.startswith("detok-fail"):
                    out.results.add(request_id=s.request_id, finished=True, error="UnicodeError: planted")
                else:
                    out.results.add(request_id=s.request_id, text="ab", token_ids=s.token_ids, finished=True,
                                    finish=s.finish, pieces=["x"] * len(s.piece_token_ids))
            yield out


async def outcome(handle) -> Chunk | Failure:
    return await asyncio.wait_for(handle.queue.get(), 10)


async def scenario(monkeypatch) -> None:
    tok_server, tok_port = await serve(EchoTokenizer(), tokenizer_pb2_grpc.add_TokenizerServicer_to_server)
    eng_server, eng_port = await serve(AnsweringEngine(), engine_pb2_grpc.add_EngineServicer_to_server)
    pipeline = Pipeline(GatewayConfig(engine=f"127.0.0.1:{eng_port}", tokenizer=f"127.0.0.1:{tok_port}",
                                      connect_timeout_s=10))
    real_piece_ids = gateway.replica._piece_ids

    def piece_ids(d, prompt_ids):
        if d.request_id == "gateway-fail":
            raise IndexError("planted in the gateway")
        return real_piece_ids(d, prompt_ids)

    monkeypatch.setattr(gateway.replica, "_piece_ids", piece_ids)
    try:
        await pipeline.start()
        params = epb.SamplingParams(max_tokens=2)
        handles = {rid: pipeline.submit(Submission(rid, [1, 2, 3], params))
                   for rid in ("ok-1", "engine-fail", "detok-fail", "gateway-fail", "ok-2")}
        got = {rid: await outcome(h) for rid, h in handles.items()}
        for rid in ("ok-1", "ok-2"):
            assert isinstance(got[rid], Chunk) and got[rid].result.text == "ab" and got[rid].result.finished
        assert got["engine-fail"] == Failure(grpc.StatusCode.INTERNAL, "the engine failed it: ValueError: planted")
        assert got["detok-fail"] == Failure(grpc.StatusCode.INTERNAL, "detokenizing failed: UnicodeError: planted")
        assert got["gateway-fail"] == Failure(grpc.StatusCode.INTERNAL,
                                              "handling the engine's output failed: IndexError: planted in the gateway")
        replica = pipeline.replicas[0]
        assert replica.live and replica.num_in_flight == 0
        after = pipeline.submit(Submission("ok-3", [1, 2, 3], params))   # the same streams still serve
        assert (await outcome(after)).result.text == "ab"
    finally:
        await pipeline.close()
        await eng_server.stop(0)
        await tok_server.stop(0)


def test_one_requests_failure_leaves_the_shared_streams_serving(monkeypatch):
    asyncio.run(scenario(monkeypatch))
