"""One structured log line per request event (start, first_token, finish, error), keyed by request id.

A client may name its request with metadata `x-request-id` (printable ASCII, at most 128 characters); it becomes
the request's request_id unless the request's own field is set. With neither, the gateway assigns one here, so
the start line already carries the id the response will carry.

Both fronts log through begin/observe/finish/fail: the gRPC API with the interceptor below, the HTTP API
(gateway/http_api.py, which reads `x-request-id` as a header) directly. Whoever routes the request records the
engine it went to with `annotate(replica=...)`; the record lives in a context variable of the call's task.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from gateway.rpc_wrap import wrap_handler

LOGGER = logging.getLogger("tandem.gateway.requests")
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
LOGGED_METHODS = ("/tandem.v1.Generation/Generate", "/tandem.v1.Generation/GenerateStream")


class InvalidRequestId(ValueError):
    pass


def validate_request_id(value: object, source: str = REQUEST_ID_KEY) -> str:
    """The same rule for the metadata and the request's field: an id is written into log lines, so a newline or
    a control character in it could forge lines."""
    if not isinstance(value, str):
        raise InvalidRequestId(f"{source}: must be text, not binary metadata")
    if not value:
        raise InvalidRequestId(f"{source}: must not be empty")
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestId(f"{source}: at most {MAX_REQUEST_ID_CHARS} characters, got {len(value)}")
    if not (value.isascii() and value.isprintable()):
        raise InvalidRequestId(f"{source}: must be printable ASCII")
    return value


def request_id_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return validate_request_id(value)
    return None


@dataclass
class RequestRecord:
    request_id: str
    method: str        # GenerateStream, Generate; POST /v1/completions, POST /v1/chat/completions
    replica: str
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0

    def fields(self, event: str, **extra) -> dict:
        now = time.monotonic()
        out = {"event": event, "request_id": self.request_id, "method": self.method,
               "replica": self.replica, "elapsed_ms": round((now - self.started) * 1000, 3)}
        if self.first_token_at is not None:
            out["ttft_ms"] = round((self.first_token_at - self.started) * 1000, 3)
        out.update(extra)
        return out


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("tandem_request", default=None)


def annotate(**values) -> None:
    """Sets fields (e.g. replica) of the current call's record; a no-op outside a logged call."""
    record = _CURRENT.get()
    if record is not None:
        for name, value in values.items():
            setattr(record, name, value)


def _emit(record: RequestRecord, event: str, level: int = logging.INFO, **extra) -> None:
    LOGGER.log(level, event, extra={"fields": record.fields(event, **extra)})


# The request's log lines, whichever front it came through (the gRPC interceptor below, the HTTP API).

def begin(request_id: str, method: str, replica: str, peer: str) -> RequestRecord:
    """Logs `start` and makes the record the current call's (so annotate() reaches it)."""
    record = RequestRecord(request_id, method, replica)
    _CURRENT.set(record)
    _emit(record, "start", peer=peer)
    return record


def observe(record: RequestRecord, response) -> None:
    """A GenerateStreamResponse or GenerateResponse on its way to the client."""
    if record.first_token_at is None and (response.token_ids or response.text):
        record.first_token_at = time.monotonic()
        _emit(record, "first_token")
    record.output_tokens += len(response.token_ids)   # so far; a stream's usage (at its end) settles it
    if response.HasField("usage"):
        record.prompt_tokens = response.usage.prompt_tokens
        record.output_tokens = response.usage.completion_tokens


def finish(record: RequestRecord) -> None:
    _emit(record, "finish", status="OK", prompt_tokens=record.prompt_tokens, output_tokens=record.output_tokens)


def fail(record: RequestRecord, status: str, message: str) -> None:
    _emit(record, "error", logging.WARNING, status=status, message=message or "",
          prompt_tokens=record.prompt_tokens, output_tokens=record.output_tokens)


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, default_replica: str) -> None:
        self.default_replica = default_replica

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in LOGGED_METHODS:
            return handler
        metadata = handler_call_details.invocation_metadata
        replica = self.default_replica

        async def start(request, context) -> RequestRecord:
            try:
                from_metadata = request_id_from_metadata(metadata)
                if request.request_id:
                    validate_request_id(request.request_id, "request_id")
            except InvalidRequestId as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if not request.request_id:
                request.request_id = from_metadata or uuid.uuid4().hex
            return begin(request.request_id, method.rsplit("/", 1)[-1], replica, context.peer())

        def failed(record: RequestRecord, context, error: BaseException) -> None:
            if isinstance(error, asyncio.CancelledError):
                expired = context.time_remaining() is not None and context.time_remaining() <= 0
                status, message = ("DEADLINE_EXCEEDED", "the client's deadline passed") if expired \
                    else ("CANCELLED", "cancelled by the client")
                code = context.code()
                if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
                    status, message = code.name, context.details() or message
            else:
                code = context.code()
                status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                message = context.details() if isinstance(error, grpc.aio.AbortError) else type(error).__name__
            fail(record, status, message)

        def unary(behaviour):
            async def run(request, context):
                record = await start(request, context)
                try:
                    response = await behaviour(request, context)
                except BaseException as e:
                    failed(record, context, e)
                    raise
                observe(record, response)
                finish(record)
                return response
            return run

        def stream(behaviour):
            async def run(request, context):
                record = await start(request, context)
                try:
                    async for response in behaviour(request, context):
                        observe(record, response)
                        yield response
                except BaseException as e:
                    failed(record, context, e)
                    raise
                finish(record)
            return run

        return wrap_handler(handler, unary_unary=unary, unary_stream=stream)
