"""The public tandem.v1.Generation service, and the gateway's main: the gRPC server, and beside it on the same
event loop the OpenAI-compatible HTTP API (gateway/http_api.py); both run requests through gateway/generation.py."""
from __future__ import annotations

import logging
import asyncio
import signal
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


async def serve(config: GatewayConfig) -> None:
    setup_logging("gateway", config.log_level, config.log_format)
    admission = Admission(config.max_in_flight, config.retry_after_ms)
    keys = load_api_keys(config.api_key_file)
    server = create_server(config, admission, keys)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME, admin.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    pipeline = Pipeline(config)
    pipeline.capacity_observer = admission.follow_engines
    flow = GenerationFlow(config, pipeline)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(flow), server)
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
        _LOG.error("could not reach the engine (%s) or the tokenizer (%s): %r", config.engine, config.tokenizer, e)
        await server.stop(0)
        raise SystemExit(1)
    info = pipeline.engine_info
    flow.metrics = GatewayMetrics(info.model_name, info.max_model_len)
    metrics_http = None
    http_api = HttpApi(config, flow, admission, keys) if config.http_port else None
    try:
        if config.metrics_port:
            metrics_http = serve_metrics_http(flow.metrics, config.host, config.metrics_port)
        if http_api is not None:
            await http_api.start()
    except (MetricsPortError, HttpPortError) as e:
        _LOG.error("%s", e)
        if metrics_http is not None:
            metrics_http.shutdown()
        await server.stop(0)
        raise SystemExit(1)
    if config.metrics_port or config.http_port:
        pipeline.load_observer = flow.metrics.observe_engine_load
    for name in ("", SERVICE_NAME, admin.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    scheme = "https" if config.tls_cert else "http"
    _LOG.info(f"listening on {config.host}:{port} (model {pipeline.engine_info.model_name})"
              + (f", OpenAI-compatible HTTP API on {scheme}://{config.host}:{config.http_port}/v1" if http_api else "")
              + (f", metrics on http://{config.host}:{config.metrics_port}/metrics" if metrics_http else ""))
    await stop.wait()
    _LOG.info("draining %d requests (up to %g s)", admission.in_flight, config.drain_timeout_s)
    ended = await drain(server, health_servicer, admission, config.drain_timeout_s)
    _LOG.info("drained; %d requests ended by the drain timeout", ended)
    if http_api is not None:
        await http_api.stop()
    if metrics_http is not None:
        metrics_http.shutdown()
    await pipeline.close()
