"""The public tandem.v1.Generation service."""
from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway import admin, request_log
from gateway.admission import Admission, retry_hint
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.metrics_export import MetricsPortError, serve_metrics_http
from gateway.logs import setup_logging
from gateway.pipeline import Failure, Pipeline
from gateway.public_server import add_public_port, create_server, drain
from gateway.structured_output import engine_structured_output
from gateway.validation import InvalidRequest, ValidatedRequest, check_prompt_bytes, check_prompt_length, validate
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api
from protos.reflection import enable_reflection
from protos.tandem.v1 import admin_pb2_grpc, generation_pb2_grpc

SERVICE_NAME = api.DESCRIPTOR.services_by_name["Generation"].full_name

_ENGINE_FINISH = {
    epb.ENGINE_FINISH_STOP_TOKEN: api.FINISH_REASON_STOP,
    epb.ENGINE_FINISH_LENGTH: api.FINISH_REASON_LENGTH,
    epb.ENGINE_FINISH_ABORTED: api.FINISH_REASON_CANCELLED,
}

# request_success_total's finished_reason values (vLLM's "stop" and "length"; "abort" is counted apart).
_FINISHED_REASON = {api.FINISH_REASON_STOP: "stop", api.FINISH_REASON_LENGTH: "length",
                    api.FINISH_REASON_CANCELLED: "cancelled"}


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.metrics: GatewayMetrics | None = None   # set by serve() once the engine's model is known

    async def GetModelInfo(self, request, context) -> api.ModelInfo:
        info = self.pipeline.engine_info
        return api.ModelInfo(model_name=info.model_name, max_context=info.max_model_len, vocab_size=info.vocab_size,
                             eos_token_ids=list(info.eos_token_ids))

    async def GenerateStream(self, request, context) -> AsyncIterator[api.GenerateStreamResponse]:
        async for chunk in self._run(request, context):
            yield chunk

    async def Generate(self, request, context) -> api.GenerateResponse:
        resp = api.GenerateResponse()
        outputs: dict[int, api.Completion] = {}
        async for chunk in self._run(request, context):
            resp.request_id = chunk.request_id
            c = outputs.setdefault(chunk.index, api.Completion(index=chunk.index))
            c.text += chunk.text
            c.token_ids.extend(chunk.token_ids)
            c.logprobs.extend(chunk.logprobs)
            resp.prompt_logprobs.extend(chunk.prompt_logprobs)
            if chunk.finish_reason:
                c.finish_reason = chunk.finish_reason
                c.cumulative_logprob = chunk.cumulative_logprob
                which = chunk.WhichOneof("stop_reason")
                if which is not None:
                    setattr(c, which, getattr(chunk, which))
            if chunk.HasField("usage"):
                resp.usage.CopyFrom(chunk.usage)
        resp.completions.extend(outputs[i] for i in sorted(outputs))
        first = resp.completions[0]
        resp.text, resp.finish_reason = first.text, first.finish_reason
        resp.token_ids.extend(first.token_ids)
        which = first.WhichOneof("stop_reason")
        if which is not None:
            setattr(resp, which, getattr(first, which))
        return resp

    async def _run(self, request: api.GenerateRequest, context) -> AsyncIterator[api.GenerateStreamResponse]:
        info = self.pipeline.engine_info
        recorder = self.metrics.request(replica=self.config.engine)
        try:
            v = validate(request, self.config, info.vocab_size)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = request.request_id or uuid.uuid4().hex   # the client's label (the log interceptor checked it)
        # Downstream the request is known by an id of the gateway's own, unique per call: a client reusing a label
        # (or naming one like another's) can never reach another request's state, tokens or detokenizer.
        internal_id = uuid.uuid4().hex
        try:
            check_prompt_bytes(v, info.max_model_len, self.pipeline.tokenizer_info.max_bytes_per_token)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            prompt_ids = await self.pipeline.encode(v.prompt, v.chat, timeout=context.time_remaining(),
                                                    max_tokens=info.max_model_len,
                                                    parse_special_tokens=v.parse_special_tokens)
        except grpc.aio.AioRpcError as e:
            code = e.code() if e.code() == grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"{'input' if code == grpc.StatusCode.INVALID_ARGUMENT else 'tokenizer'}: "
                                      f"{e.details()}")
        try:
            check_prompt_length(len(prompt_ids), info.max_model_len)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        params = self._engine_params(v, len(prompt_ids), info.max_model_len)
        try:
            handle = self.pipeline.submit(internal_id, prompt_ids, params, v.stop, v.priority, v.cache_salt,
                                          include_stop_str_in_output=v.include_stop_str_in_output,
                                          skip_special_tokens=v.skip_special_tokens,
                                          spaces_between_special_tokens=v.spaces_between_special_tokens,
                                          adapter=v.adapter)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        recorder.routed(handle.replica)
        request_log.annotate(replica=handle.replica)
        recorder.submitted(len(prompt_ids))
        echo = (v.prompt if v.prompt is not None else await self._decode(prompt_ids, v, context)) if v.echo else None
        completion_tokens = 0
        finished = False
        started: set[int] = set()
        try:
            while len(handle.ended_by_client) < handle.n:
                item = await handle.queue.get()
                if isinstance(item, Failure):
                    finished = True
                    hint = retry_hint(self.config.retry_after_ms) \
                        if item.code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
                    message = f"request {request_id}: {item.message}" \
                        if item.code == grpc.StatusCode.INTERNAL else item.message
                    await context.abort(item.code, message, hint)
                r, d = item.result, item.delta
                completion_tokens += len(r.token_ids)
                chunk = api.GenerateStreamResponse(request_id=request_id, index=item.index, text=r.text,
                                                   token_ids=r.token_ids)
                recorder.chunk(item.index, len(r.token_ids))
                _add_logprobs(chunk, d, r, prompt_ids)
                if item.index not in started:
                    started.add(item.index)
                    if echo is not None:
                        chunk.text = echo + chunk.text
                        chunk.token_ids[:0] = prompt_ids
                if r.finished:
                    handle.ended_by_client.add(item.index)
                    self._finish(chunk, r)
                    if v.logprobs is not None or v.best_of > 1:
                        chunk.cumulative_logprob = d.cumulative_logprob
                    if len(handle.ended_by_client) == handle.n:
                        finished = True
                        chunk.usage.prompt_tokens = len(prompt_ids)
                        chunk.usage.completion_tokens = completion_tokens
                        chunk.usage.cached_prompt_tokens = handle.num_cached_tokens
                        recorder.finished(_FINISHED_REASON[chunk.finish_reason])
                yield chunk
        finally:
            if not finished:  # client cancel, deadline, or a failed write: stop the work downstream
                self.pipeline.cancel(internal_id)
                recorder.aborted()

    async def _decode(self, ids: list[int], v: ValidatedRequest, context) -> str:
        return await self.pipeline.decode(ids, v.skip_special_tokens, timeout=context.time_remaining())

    def _engine_params(self, v: ValidatedRequest, prompt_len: int, max_model_len: int) -> epb.SamplingParams:
        room = max_model_len - prompt_len
        max_tokens = min(v.max_tokens if v.max_tokens is not None else self.config.default_max_tokens, room)
        params = epb.SamplingParams(
            temperature=v.temperature, top_p=v.top_p, top_k=v.top_k, max_tokens=max_tokens,
            stop_token_ids=v.stop_token_ids, min_p=v.min_p, repetition_penalty=v.repetition_penalty,
            presence_penalty=v.presence_penalty, frequency_penalty=v.frequency_penalty, logit_bias=dict(v.logit_bias),
            allowed_token_ids=v.allowed_token_ids, min_tokens=min(v.min_tokens, max_tokens), ignore_eos=v.ignore_eos,
            n=v.n, best_of=v.best_of, use_beam_search=v.use_beam_search, length_penalty=v.length_penalty)
        if v.seed is not None:
            params.seed = v.seed
        if v.logprobs is not None:
            params.logprobs = v.logprobs
        if v.prompt_logprobs is not None:
            params.prompt_logprobs = v.prompt_logprobs
        if v.structured_output is not None:
            params.structured_output.CopyFrom(engine_structured_output(v.structured_output))
        return params

    @staticmethod
    def _finish(chunk: api.GenerateStreamResponse, r) -> None:
        if r.matched_stop:
            chunk.finish_reason = api.FINISH_REASON_STOP
            chunk.stop_string = r.matched_stop
            return
        chunk.finish_reason = _ENGINE_FINISH[r.finish]
        if r.finish == epb.ENGINE_FINISH_STOP_TOKEN and r.token_ids:
            chunk.stop_token_id = r.token_ids[-1]


def _add_logprobs(chunk: api.GenerateStreamResponse, d: epb.RequestDelta, r, prompt_ids: list[int]) -> None:
    """Engine logprobs with each token's text, read back from r.pieces in the order pipeline._piece_ids asked."""
    pieces = iter(r.pieces)

    def entry(lp) -> api.TokenLogprob:
        text = next(pieces)
        return api.TokenLogprob(token_id=lp.token_id, token=text, logprob=lp.logprob,
                                top=[api.TopLogprob(token_id=t, token=next(pieces), logprob=v)
                                     for t, v in zip(lp.top_token_ids, lp.top_logprobs)])

    entries = [entry(lp) for lp in d.logprobs]
    chunk.logprobs.extend(entries[:len(r.token_ids)])   # a stop string may have cut the step short
    if d.prompt_logprobs:
        chunk.prompt_logprobs.append(api.TokenLogprob(token_id=prompt_ids[0], token=next(pieces)))
        chunk.prompt_logprobs.extend(entry(lp) for lp in d.prompt_logprobs)


async def serve(config: GatewayConfig) -> None:
    setup_logging(config.log_format)
    admission = Admission(config.max_in_flight, config.retry_after_ms)
    server = create_server(config, admission)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME, admin.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    pipeline = Pipeline(config)
    servicer = GenerationServicer(config, pipeline)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin.AdminServicer(pipeline.engine_stub), server)
    enable_reflection((SERVICE_NAME, admin.SERVICE_NAME, health.SERVICE_NAME), server)
    port = add_public_port(server, config)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    await server.start()
    try:
        await pipeline.start()
    except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
        print(f"gateway: could not reach the engine ({config.engine}) or the tokenizer ({config.tokenizer}): "
              f"{e!r}", file=sys.stderr, flush=True)
        await server.stop(0)
        raise SystemExit(1)
    info = pipeline.engine_info
    servicer.metrics = GatewayMetrics(info.model_name, info.max_model_len)
    metrics_http = None
    if config.metrics_port:
        try:
            metrics_http = serve_metrics_http(servicer.metrics, config.host, config.metrics_port)
        except MetricsPortError as e:
            print(f"gateway: {e}", file=sys.stderr, flush=True)
            await server.stop(0)
            raise SystemExit(1)
        pipeline.load_observer = servicer.metrics.observe_engine_load
    for name in ("", SERVICE_NAME, admin.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"gateway listening on {config.host}:{port} (model {pipeline.engine_info.model_name})"
          + (f", metrics on http://{config.host}:{config.metrics_port}/metrics" if metrics_http else ""),
          file=sys.stderr, flush=True)
    await stop.wait()
    print(f"gateway: draining {admission.in_flight} requests (up to {config.drain_timeout_s:g} s)",
          file=sys.stderr, flush=True)
    ended = await drain(server, health_servicer, admission, config.drain_timeout_s)
    print(f"gateway: drained; {ended} requests ended by the drain timeout", file=sys.stderr, flush=True)
    if metrics_http is not None:
        metrics_http.shutdown()
    await pipeline.close()
