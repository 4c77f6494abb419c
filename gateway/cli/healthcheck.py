"""Asks a service for its overall grpc.health.v1 status.

Used by the launcher while it waits for the services to start, and by docker compose healthchecks:
`python -m gateway.cli.healthcheck HOST:PORT` exits 0 only when the service reports SERVING.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Reconnect quickly while a service is still starting: the default backoff grows to two minutes, which would
# delay noticing an engine that took a while to load. The proxy is off because these are local/compose hops.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_http_proxy", 0),
)

SERVING = health_pb2.HealthCheckResponse.SERVING


def open_channel(address: str, tls_roots: bytes | None = None, tls_server_name: str | None = None) -> grpc.Channel:
    """Plaintext, or TLS trusting tls_roots (PEM) when given; tls_server_name overrides the name the certificate
    is checked against (the probe dials 127.0.0.1, which a public certificate may not name)."""
    if tls_roots is None:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    options = _CHANNEL_OPTIONS + ((("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ())
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_roots), options=options)


def check(channel: grpc.Channel, timeout_s: float) -> str:
    """The overall ("" service) status name, e.g. 'SERVING', or 'UNREACHABLE: <code>' when the RPC fails."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as err:
        return f"UNREACHABLE: {err.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def is_serving(channel: grpc.Channel, timeout_s: float) -> bool:
    return check(channel, timeout_s) == "SERVING"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.cli.healthcheck",
                                     description="Exit 0 when the service at ADDRESS reports SERVING.")
    parser.add_argument("address", help="HOST:PORT of a Tandem service")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", help="probe over TLS, trusting this PEM CA")
    parser.add_argument("--tls-server-name", help="name the certificate is checked against")
    args = parser.parse_args(argv)
    roots = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            roots = f.read()
    with open_channel(args.address, roots, args.tls_server_name) as channel:
        status = check(channel, args.timeout)
    if status != "SERVING":
        print(f"{args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
