"""Serves a GatewayMetrics registry on /metrics over HTTP. Its engine-side metrics are fed by the pipeline's
load poller (Pipeline.load_observer), which already asks every replica for its load."""
from __future__ import annotations

from prometheus_client import start_http_server

from gateway.metrics import GatewayMetrics


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
