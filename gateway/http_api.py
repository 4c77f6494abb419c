"""The OpenAI-compatible HTTP API (aiohttp), served by the gateway process on its own event loop beside gRPC:

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events ending `data: [DONE]`)
    GET  /v1/models, GET /health, GET /metrics

Each generation runs through gateway/generation.py, the gRPC API's own path (no second gRPC hop), under the same
API keys (`Authorization: Bearer`), admission bound and drain, request log and metrics. Errors are OpenAI error
objects (gateway/http_errors.py). A streamed response starts once the first chunk is ready, so an error found
before it (a bad field, an unknown model, a full engine) still gets its status code; one after it ends the stream
with an error event. A client that disconnects cancels its handler (handler_cancellation), which aborts the request
in the engine as a gRPC cancel does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import uuid
from typing import AsyncIterator

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import request_log
from gateway.admission import Admission
from gateway.auth import check_authorization
from gateway.config import GatewayConfig
from gateway.generation import GenerationFlow, RequestFailed, collect
from gateway.http_errors import error_body, error_response, failure_response
from gateway.openai_request import CHAT, COMPLETIONS, BadField, UnknownModel, parse
from gateway.openai_response import ResponseBuilder
from gateway.request_log import REQUEST_ID_KEY, InvalidRequestId, validate_request_id
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

DONE = b"data: [DONE]\n\n"
_EVICTED = "draining: the server shut down before this request finished"


class HttpPortError(RuntimeError):
    pass


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class HttpApi:
    def __init__(self, config: GatewayConfig, flow: GenerationFlow, admission: Admission,
                 keys: tuple[str, ...]) -> None:
        self.config = config
        self.flow = flow
        self.admission = admission
        self.keys = keys
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_auth], client_max_size=self.config.max_request_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        # handler_cancellation: a client that goes away cancels its handler, and so its request in the engine.
        # The drain has ended every generation before stop(): what is left to wait for is short.
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        tls = None
        if self.config.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port, ssl_context=tls)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise HttpPortError(f"HTTP port {self.config.host}:{self.config.http_port}: {e.strerror or e}; choose "
                                f"another with --http-port") from None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for http_port 0)."""
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- middleware ---------------------------------------------------------------------------------------------

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler):
        if self.keys and request.path.startswith("/v1/"):
            error = check_authorization(request.headers.get("Authorization"), self.keys, "header")
            if error is not None:
                return error_response(grpc.StatusCode.UNAUTHENTICATED, error)
        try:
            return await handler(request)
        except web.HTTPException as e:   # aiohttp's own 404, 405, 413: as OpenAI error objects too
            if e.status < 400:
                raise
            _, body = error_body(grpc.StatusCode.UNKNOWN, f"{request.method} {request.path}: {e.reason}")
            body["error"]["type"] = "invalid_request_error"
            return web.json_response(body, status=e.status)

    # --- endpoints ----------------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self.admission.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.flow.metrics.registry), headers={
            "Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        info = self.flow.pipeline.engine_info
        try:
            adapters = (await self.flow.pipeline.engine_stub.ListAdapters(epb.ListAdaptersRequest(),
                                                                          timeout=5.0)).adapters
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:   # that one: an engine without LoRA
                return error_response(e.code(), f"listing adapters: {e.details()}")
            adapters = []
        cards = [self._card(info.model_name, root=info.model_name, parent=None)]
        cards += [self._card(a.name, root=a.path, parent=info.model_name) for a in adapters if not a.unloading]
        return web.json_response({"object": "list", "data": cards})

    def _card(self, name: str, root: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "tandem", "root": root,
                "parent": parent, "max_model_len": self.flow.pipeline.engine_info.max_model_len}

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        refusal = self.admission.refusal(limited=True)
        if refusal is not None:
            return self._refused(refusal)
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, f"body: not valid JSON ({e})", param="body")
        try:
            req = parse(body, kind, self.flow.pipeline.engine_info.model_name)
            label = req.requests[0].request_id or _header_request_id(request) or uuid.uuid4().hex
            if len(req.requests) > self.admission.max_in_flight:
                raise BadField("prompt", f"at most {self.admission.max_in_flight} prompts (the server's max in flight), "
                                         f"got {len(req.requests)}")
        except BadField as e:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(e), param=e.param)
        except UnknownModel as e:
            return error_response(grpc.StatusCode.NOT_FOUND, str(e), param="model")
        # Each prompt is one generation in flight (checked again: the body may have taken a while to arrive).
        refusal = self.admission.refusal(limited=True, needed=len(req.requests))
        if refusal is not None:
            return self._refused(refusal)
        for r in req.requests:
            r.request_id = label
        exchange = _Exchange(request, f"POST {request.path}", ResponseBuilder(req, label))
        entries = [self.admission.enter() for _ in req.requests]
        try:
            if req.stream:
                return await self._stream(exchange)
            return await self._whole(exchange)
        except asyncio.CancelledError:
            if not any(entry.evicted for entry in entries):
                raise
            task = asyncio.current_task()   # the drain ended it: answer 503 instead of dropping the connection
            while task.cancelling():        # (cancelled once per prompt in flight)
                task.uncancel()
            if exchange.response is None:
                return error_response(grpc.StatusCode.UNAVAILABLE, _EVICTED)
            await exchange.end_with_error(grpc.StatusCode.UNAVAILABLE, _EVICTED)
            return exchange.response
        finally:
            for entry in entries:
                self.admission.leave(entry)

    def _refused(self, refusal: tuple[grpc.StatusCode, str, tuple]) -> web.Response:
        code, message, _ = refusal
        return error_response(code, message, retry_after_ms=self.config.retry_after_ms
                              if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None)

    async def _whole(self, x: "_Exchange") -> web.Response:
        requests = x.builder.req.requests
        try:
            if len(requests) == 1:
                responses = [await collect(self._logged(requests[0], x))]
            else:
                tasks = [asyncio.ensure_future(collect(self._logged(r, x))) for r in requests]
                try:
                    responses = await asyncio.gather(*tasks)
                finally:
                    for task in tasks:   # one prompt failed: stop the others
                        task.cancel()
        except RequestFailed as e:
            return failure_response(e, x.builder.req.names)
        return web.json_response(x.builder.whole(responses), headers={"X-Request-Id": requests[0].request_id},
                                 dumps=_dumps)

    async def _stream(self, x: "_Exchange") -> web.StreamResponse:
        builder = x.builder
        usage: api.Usage | None = None
        async with contextlib.aclosing(self._logged(builder.req.requests[0], x)) as chunks:
            try:
                first = await anext(chunks)
            except RequestFailed as e:
                return failure_response(e, builder.req.names)
            await x.prepare()
            try:
                chunk = first
                while True:
                    if chunk.HasField("usage"):
                        usage = chunk.usage
                    obj = builder.chunk(chunk)
                    if obj is not None:
                        await x.response.write(_sse(obj))
                    chunk = await anext(chunks, None)
                    if chunk is None:
                        break
            except RequestFailed as e:
                await x.end_with_error(e.code, e.message)
                return x.response
            except ConnectionError:   # the client went away mid-stream; leaving aborts the request
                return x.response
        if builder.req.include_usage:
            await x.response.write(_sse(builder.usage_chunk(usage)))
        await x.response.write(DONE)
        await x.response.write_eof()
        return x.response

    async def _logged(self, req: api.GenerateRequest, x: "_Exchange") -> AsyncIterator[api.GenerateStreamResponse]:
        """The flow's chunks, with the request log's start, first_token and finish or error lines."""
        record = request_log.begin(req.request_id, x.method, self.config.engine, x.peer)
        try:
            # Closed explicitly: a stream the client left must abort its request now, not when collected.
            async with contextlib.aclosing(self.flow.stream(req)) as chunks:
                async for chunk in chunks:
                    request_log.observe(record, chunk)
                    yield chunk
        except RequestFailed as e:
            request_log.fail(record, e.code.name, e.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            request_log.fail(record, "CANCELLED", "the client went away")
            raise
        request_log.finish(record)


class _Exchange:
    """One HTTP generation call: its request, and its event-stream response once started."""

    def __init__(self, request: web.Request, method: str, builder: ResponseBuilder) -> None:
        self.request = request
        self.method = method
        self.peer = f"http:{request.remote}"
        self.builder = builder
        self.response: web.StreamResponse | None = None

    async def prepare(self) -> None:
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                    "X-Request-Id": self.builder.req.requests[0].request_id})
        await self.response.prepare(self.request)

    async def end_with_error(self, code: grpc.StatusCode, message: str) -> None:
        """A failure after the stream started: an error event (which the openai clients raise), then the end."""
        _, body = error_body(code, message, self.builder.req.names)
        await self.response.write(_sse(body))
        await self.response.write(DONE)
        await self.response.write_eof()


def _header_request_id(request: web.Request) -> str | None:
    value = request.headers.get(REQUEST_ID_KEY)
    if value is None:
        return None
    try:
        return validate_request_id(value)
    except InvalidRequestId as e:
        raise BadField(REQUEST_ID_KEY, str(e).partition(": ")[2]) from None


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
