"""The public tandem.v1.Generation service, and the gateway's main: the gRPC server, and beside it on the same
event loop the OpenAI-compatible HTTP API (gateway/http_api.py); both run requests through gateway/generation.py."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway import admin
from gateway.admission import Admission, retry_hint
from gateway.auth import load_api_keys
from gateway.config import GatewayConfig
from gateway.generation import GenerationFlow, RequestFailed, collect
from gateway.http_api import HttpApi, HttpPortError
from gateway.metrics import GatewayMetrics
from gateway.metrics_export import MetricsPortError, serve_metrics_http
from gateway.pipeline import Pipeline
from gateway.public_server import add_public_port, create_server, drain
from protos.reflection import enable_reflection
from protos.service_logging import setup_logging
from protos.tandem.v1 import admin_pb2_grpc, generation_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api

_LOG = logging.getLogger("tandem.gateway")

SERVICE_NAME = api.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, flow: GenerationFlow) -> None:
        self.flow = flow

    async def GetModelInfo(self, request, context) -> api.ModelInfo:
        info = self.flow.pipeline.engine_info
        return api.ModelInfo(model_name=info.model_name, max_context=info.max_model_len, vocab_size=info.vocab_size,
                             eos_token_ids=list(info.eos_token_ids))

    async def GenerateStream(self, request, context) -> AsyncIterator[api.GenerateStreamResponse]:
        async for chunk in self._run(request, context):
            yield chunk

    async def Generate(self, request, context) -> api.GenerateResponse:
        return await collect(self._run(request, context))

    async def _run(self, request: api.GenerateRequest, context) -> AsyncIterator[api.GenerateStreamResponse]:
        try:
            async for chunk in self.flow.stream(request, context.time_remaining):
                yield chunk
        except RequestFailed as e:
            hint = retry_hint(e.retry_after_ms) if e.retry_after_ms is not None else ()
            await context.abort(e.code, e.message, hint)


_SERVICES = ("", SERVICE_NAME, admin.SERVICE_NAME)


@dataclass
class _Gateway:
    """The gateway's parts, built once: the public gRPC server and what serves on it, then (once the engines
    answered) the optional fronts beside it on the same event loop."""
    config: GatewayConfig
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    admission: Admission
    keys: tuple[str, ...]
    pipeline: Pipeline
    flow: GenerationFlow
    port: int
    http_api: HttpApi | None = None
    metrics_http: object = None   # the /metrics HTTP server (serve_metrics_http), or None

    async def set_health(self, status) -> None:
        await asyncio.gather(*(self.health.set(name, status) for name in _SERVICES))


async def serve(config: GatewayConfig) -> None:
    """Opens the public port (NOT_SERVING), reaches the engines and tokenizers, starts the HTTP fronts, serves
    until SIGINT or SIGTERM, then drains."""
    setup_logging("gateway", config.log_level, config.log_format)
    gw = await _build(config)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await gw.server.start()
    await _reach_backends(gw)
    await _start_fronts(gw)
    await gw.set_health(health_pb2.HealthCheckResponse.SERVING)
    scheme = "https" if config.tls_cert else "http"
    _LOG.info(f"listening on {config.host}:{gw.port} (model {gw.pipeline.engine_info.model_name})"
              + (f", OpenAI-compatible HTTP API on {scheme}://{config.host}:{config.http_port}/v1"
                 if gw.http_api else "")
              + (f", metrics on http://{config.host}:{config.metrics_port}/metrics" if gw.metrics_http else ""))
    await stop.wait()
    await _shut_down(gw)


async def _build(config: GatewayConfig) -> _Gateway:
    admission = Admission(config.max_in_flight, config.retry_after_ms)
    keys = load_api_keys(config.api_key_file)
    server = create_server(config, admission, keys)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pipeline = Pipeline(config)
    pipeline.capacity_observer = admission.follow_engines
    flow = GenerationFlow(config, pipeline)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(flow), server)
    admin_pb2_grpc.add_AdminServicer_to_server(admin.AdminServicer(pipeline.engine_stub), server)
    enable_reflection((SERVICE_NAME, admin.SERVICE_NAME, health.SERVICE_NAME), server)
    gw = _Gateway(config, server, health_servicer, admission, keys, pipeline, flow, add_public_port(server, config))
    await gw.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    return gw


async def _reach_backends(gw: _Gateway) -> None:
    """Connects to the engines and tokenizers (exits non-zero when it cannot), then sizes the metrics by the
    engines' model."""
    try:
        await gw.pipeline.start()
    except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
        _LOG.error("could not reach the engine (%s) or the tokenizer (%s): %r", gw.config.engine,
                   gw.config.tokenizer, e)
        await gw.server.stop(0)
        raise SystemExit(1)
    info = gw.pipeline.engine_info
    gw.flow.metrics = GatewayMetrics(info.model_name, info.max_model_len)


async def _start_fronts(gw: _Gateway) -> None:
    """/metrics and the OpenAI-compatible HTTP API, when configured; a port that cannot be bound exits non-zero."""
    config = gw.config
    gw.http_api = HttpApi(config, gw.flow, gw.admission, gw.keys) if config.http_port else None
    try:
        if config.metrics_port:
            gw.metrics_http = serve_metrics_http(gw.flow.metrics, config.host, config.metrics_port)
        if gw.http_api is not None:
            await gw.http_api.start()
    except (MetricsPortError, HttpPortError) as e:
        _LOG.error("%s", e)
        if gw.metrics_http is not None:
            gw.metrics_http.shutdown()
        await gw.server.stop(0)
        raise SystemExit(1)
    if config.metrics_port or config.http_port:
        gw.pipeline.load_observer = gw.flow.metrics.observe_engine_load


async def _shut_down(gw: _Gateway) -> None:
    _LOG.info("draining %d requests (up to %g s)", gw.admission.in_flight, gw.config.drain_timeout_s)
    ended = await drain(gw.server, gw.health, gw.admission, gw.config.drain_timeout_s)
    _LOG.info("drained; %d requests ended by the drain timeout", ended)
    if gw.http_api is not None:
        await gw.http_api.stop()
    if gw.metrics_http is not None:
        gw.metrics_http.shutdown()
    await gw.pipeline.close()
