"""`python -m gateway.cli.healthcheck ADDR`, the probe docker compose runs and the launcher shares."""
from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.cli import healthcheck


@pytest.fixture
def health_server():
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_exit_0_only_when_serving(health_server, capsys) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([address]) == 1
    assert capsys.readouterr().err == f"{address}: NOT_SERVING\n"
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([address]) == 0


def test_unreachable_is_unhealthy(capsys) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert healthcheck.main([address, "--timeout", "2"]) == 1
    assert capsys.readouterr().err == f"{address}: UNREACHABLE: UNAVAILABLE\n"
