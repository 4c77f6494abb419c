"""One generation request's path through the gateway, shared by both public fronts (the gRPC servicer and the
OpenAI-compatible HTTP API): validate -> encode -> submit -> stream chunks -> finish, with usage and metrics.

A front builds a tandem.v1.GenerateRequest (the HTTP front from its JSON), iterates `GenerationFlow.stream()` and
maps a RequestFailed to its own status. Leaving the iteration early (a client cancel, a disconnect, a failed write)
aborts the request in the engine.
"""
from __future__ import annotations

import uuid
from typing import AsyncIterator, Callable

import grpc

from gateway import request_log
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Failure, Pipeline
from gateway.structured_output import engine_structured_output
from gateway.validation import InvalidRequest, ValidatedRequest, check_prompt_bytes, check_prompt_length, validate
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

_ENGINE_FINISH = {
    epb.ENGINE_FINISH_STOP_TOKEN: api.FINISH_REASON_STOP,
    epb.ENGINE_FINISH_LENGTH: api.FINISH_REASON_LENGTH,
    epb.ENGINE_FINISH_ABORTED: api.FINISH_REASON_CANCELLED,
}

# request_success_total's finished_reason values (vLLM's "stop" and "length"; "abort" is counted apart).
_FINISHED_REASON = {api.FINISH_REASON_STOP: "stop", api.FINISH_REASON_LENGTH: "length",
                    api.FINISH_REASON_CANCELLED: "cancelled"}

TimeRemaining = Callable[[], "float | None"]


class RequestFailed(Exception):
    """Ends one request with a status and a message naming the cause; retry_after_ms is set for capacity."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def _no_deadline() -> None:
    return None


class GenerationFlow:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.metrics: GatewayMetrics | None = None   # set by serve() once the engine's model is known

    async def stream(self, request: api.GenerateRequest, time_remaining: TimeRemaining = _no_deadline
                     ) -> AsyncIterator[api.GenerateStreamResponse]:
        """The request's chunks, as GenerateStream sends them; raises RequestFailed. time_remaining: the client's
        deadline in seconds (None: none), bounding the tokenizer calls."""
        info = self.pipeline.engine_info
        recorder = self.metrics.request(replica=self.config.engine)
        v = _checked(lambda: validate(request, self.config, info.vocab_size))
        request_id = request.request_id or uuid.uuid4().hex   # the client's label (the front checked it)
        # Downstream the request is known by an id of the gateway's own, unique per call: a client reusing a label
        # (or naming one like another's) can never reach another request's state, tokens or detokenizer.
        internal_id = uuid.uuid4().hex
        _checked(lambda: check_prompt_bytes(v, info.max_model_len, self.pipeline.tokenizer_info.max_bytes_per_token))
        try:
            prompt_ids = await self.pipeline.encode(v.prompt, v.chat, timeout=time_remaining(),
                                                    max_tokens=info.max_model_len,
                                                    parse_special_tokens=v.parse_special_tokens)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                # Too many tokens (OUT_OF_RANGE), or a chat template's refusal: named by the input's field.
                field = "prompt" if v.prompt is not None else "chat.messages"
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{field}: {(e.details() or '').removeprefix('prompt: ')}") from None
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"tokenizer: {e.details()}") from None
        _checked(lambda: check_prompt_length(len(prompt_ids), info.max_model_len))

        params = self._engine_params(v, len(prompt_ids), info.max_model_len)
        try:
            handle = self.pipeline.submit(internal_id, prompt_ids, params, v.stop, v.priority, v.cache_salt,
                                          include_stop_str_in_output=v.include_stop_str_in_output,
                                          skip_special_tokens=v.skip_special_tokens,
                                          spaces_between_special_tokens=v.spaces_between_special_tokens,
                                          adapter=v.adapter)
        except ValueError as e:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        recorder.routed(handle.replica)
        request_log.annotate(replica=handle.replica)
        recorder.submitted(len(prompt_ids))
        finished = False
        try:
            echo = None
            if v.echo:
                echo = v.prompt if v.prompt is not None else await self._decode(prompt_ids, v, time_remaining)
            completion_tokens = 0
            started: set[int] = set()
            while len(handle.ended_by_client) < handle.n:
                item = await handle.queue.get()
                if isinstance(item, Failure):
                    finished = True
                    capacity = item.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    message = f"request {request_id}: {item.message}" \
                        if item.code == grpc.StatusCode.INTERNAL else item.message
                    raise RequestFailed(item.code, message, self.config.retry_after_ms if capacity else None)
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
                    _finish(chunk, r)
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
            if not finished:  # client cancel, deadline, a disconnect or a failed write: stop the work downstream
                self.pipeline.cancel(internal_id)
                recorder.aborted()

    async def _decode(self, ids: list[int], v: ValidatedRequest, time_remaining: TimeRemaining) -> str:
        try:
            return await self.pipeline.decode(ids, v.skip_special_tokens, timeout=time_remaining())
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"tokenizer: {e.details()}") from None

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


def _checked(check):
    try:
        return check()
    except InvalidRequest as e:
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


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


async def collect(chunks: AsyncIterator[api.GenerateStreamResponse]) -> api.GenerateResponse:
    """A whole generation (what Generate returns) from its stream of chunks."""
    resp = api.GenerateResponse()
    outputs: dict[int, api.Completion] = {}
    async for chunk in chunks:
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
