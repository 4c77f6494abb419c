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
from gateway.client_reply import ClientReply
from gateway.pipeline import Failure, Pipeline, RequestHandle, Submission, TextOptions
from gateway.structured_output import engine_structured_output
from gateway.validation import InvalidRequest, ValidatedRequest, check_prompt_bytes, check_prompt_length, validate
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

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
        recorder = self.metrics.request(replica=self.config.engine)
        v = _checked(lambda: validate(request, self.config, self.pipeline.engine_info.vocab_size))
        prompt_ids = await self._encode(v, time_remaining)
        handle = self._submit(v, prompt_ids)
        recorder.routed(handle.replica)
        request_log.annotate(replica=handle.replica)
        recorder.submitted(len(prompt_ids))
        reply = ClientReply(request.request_id or uuid.uuid4().hex, v, handle)   # the client's label (checked)
        ended = False   # every output sent its end, or the request failed downstream
        try:
            if v.echo:
                reply.echo = v.prompt if v.prompt is not None else await self._decode(prompt_ids, v, time_remaining)
            while not reply.complete:
                item = await handle.queue.get()
                if isinstance(item, Failure):
                    ended = True
                    raise self._failed(item, reply.request_id)
                chunk = reply.chunk(item)
                recorder.chunk(item.index, len(item.result.token_ids))
                if reply.complete:
                    ended = True
                    recorder.finished(_FINISHED_REASON[chunk.finish_reason])
                yield chunk
        finally:
            if not ended:  # client cancel, deadline, a disconnect or a failed write: stop the work downstream
                self.pipeline.cancel(handle.request_id)
                recorder.aborted()

    async def _encode(self, v: ValidatedRequest, time_remaining: TimeRemaining) -> list[int]:
        """The prompt's token ids, checked against the context both before (by bytes) and after encoding."""
        info = self.pipeline.engine_info
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
        return prompt_ids

    def _submit(self, v: ValidatedRequest, prompt_ids: list[int]) -> RequestHandle:
        # Downstream the request is known by an id of the gateway's own, unique per call: a client reusing a label
        # (or naming one like another's) can never reach another request's state, tokens or detokenizer.
        text = TextOptions(stop=v.stop, include_stop_str_in_output=v.include_stop_str_in_output,
                           skip_special_tokens=v.skip_special_tokens,
                           spaces_between_special_tokens=v.spaces_between_special_tokens)
        sub = Submission(uuid.uuid4().hex, prompt_ids, self._engine_params(v, len(prompt_ids)), text,
                         priority=v.priority, cache_salt=v.cache_salt, adapter=v.adapter)
        try:
            return self.pipeline.submit(sub)
        except ValueError as e:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def _failed(self, failure: Failure, request_id: str) -> RequestFailed:
        capacity = failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = f"request {request_id}: {failure.message}" \
            if failure.code == grpc.StatusCode.INTERNAL else failure.message
        return RequestFailed(failure.code, message, self.config.retry_after_ms if capacity else None)

    async def _decode(self, ids: list[int], v: ValidatedRequest, time_remaining: TimeRemaining) -> str:
        try:
            return await self.pipeline.decode(ids, v.skip_special_tokens, timeout=time_remaining())
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"tokenizer: {e.details()}") from None

    def _engine_params(self, v: ValidatedRequest, prompt_len: int) -> epb.SamplingParams:
        room = self.pipeline.engine_info.max_model_len - prompt_len
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
