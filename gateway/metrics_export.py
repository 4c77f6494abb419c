"""Serves a GatewayMetrics registry on /metrics over HTTP and keeps its engine-side metrics fresh."""
from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, Callable

import grpc
from prometheus_client import start_http_server

from gateway.metrics import GatewayMetrics

ENGINE_LOAD_POLL_S = 1.0


class MetricsPortError(RuntimeError):
    pass


def serve_metrics_http(metrics: GatewayMetrics, host: str, port: int):
    """Starts the exposition server on a daemon thread; returns it (shutdown() stops it)."""
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise MetricsPortError(f"metrics port {host}:{port}: {e.strerror or e}; choose another with "
                               f"--metrics-port") from None
    return server


async def poll_engine_load(metrics: GatewayMetrics, replica: str,
                           fetch: Callable[[], Awaitable[object]], interval_s: float = ENGINE_LOAD_POLL_S) -> None:
    """Runs until cancelled. An engine that does not answer keeps its last values; that is said once per outage."""
    failing = False
    while True:
        try:
            metrics.observe_engine_load(replica, await fetch())
            failing = False
        except grpc.aio.AioRpcError as e:
            if not failing:
                print(f"[gateway] metrics: GetLoad from {replica} failed: {e.code().name}", file=sys.stderr,
                      flush=True)
            failing = True
        await asyncio.sleep(interval_s)
