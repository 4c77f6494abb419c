"""The public grpc.aio server's policies, assembled from the config: API keys, request ids and logs, admission
(max in flight, drain), the request size limit and TLS. Health and reflection pass through every interceptor."""
from __future__ import annotations

import logging
import ipaddress

import grpc
from grpc_health.v1 import health, health_pb2

from gateway import tls
from gateway.admission import Admission, AdmissionInterceptor
from gateway.auth import ApiKeyInterceptor, load_api_keys
from gateway.config import GatewayConfig
from gateway.request_decoding import RequestDecodingInterceptor
from gateway.request_log import RequestLogInterceptor

_LOG = logging.getLogger("tandem.gateway")


def create_server(config: GatewayConfig, admission: Admission,
                  keys: tuple[str, ...] | None = None) -> grpc.aio.Server:
    """keys: the API keys (None: read them from the configuration)."""
    # First, so that its wrapper is outermost (see gateway/request_decoding.py).
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestDecodingInterceptor()]
    keys = load_api_keys(config.api_key_file) if keys is None else keys
    warning = exposure_warning(config, keys)
    if warning:
        _LOG.warning(warning)
    if keys:
        interceptors.append(ApiKeyInterceptor(keys))   # first: nothing else runs for an unauthenticated call
    interceptors += [RequestLogInterceptor(config.engine), AdmissionInterceptor(admission)]
    return grpc.aio.server(interceptors=interceptors,
                           options=[("grpc.max_receive_message_length", config.max_request_bytes)])


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost); a name or a wildcard
    such as 0.0.0.0 is taken as reachable from elsewhere."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(config: GatewayConfig, keys: tuple[str, ...]) -> str | None:
    """The warning for a public port other machines can reach with no API key configured; None otherwise."""
    if keys or is_loopback(config.host):
        return None
    others = ([f"the HTTP API on port {config.http_port}"] if config.http_port else []) + (
        [f"/metrics on port {config.metrics_port}"] if config.metrics_port else [])
    metrics = f" (and {' and '.join(others)})" if others else ""
    return (f"the public API on {config.host}:{config.port}{metrics} is reachable from other "
            f"machines and no API key is configured: anyone who can connect can generate and load or unload "
            f"adapters. Set --api-key-file or TANDEM_API_KEYS, or bind --host 127.0.0.1.")


def add_public_port(server: grpc.aio.Server, config: GatewayConfig) -> int:
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        return server.add_secure_port(address, tls.server_credentials(config.tls_cert, config.tls_key))
    return server.add_insecure_port(address)


async def drain(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, admission: Admission,
                timeout_s: float) -> int:
    """SIGTERM: NOT_SERVING at once, refuse new calls, let in-flight calls finish for timeout_s, end the rest with
    UNAVAILABLE, then stop the server. Returns how many calls were ended by the timeout."""
    await health_servicer.enter_graceful_shutdown()   # every service NOT_SERVING, and it stays so
    ended = await admission.drain(timeout_s)
    await server.stop(grace=1.0)
    return ended
