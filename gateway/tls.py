"""TLS for the public port (PEM files). Internal ports never use it: they bind loopback or the compose network."""
from __future__ import annotations

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: {path} is not a PEM file")
    return data


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key_path, "--tls-key"), _read(cert_path, "--tls-cert"))])


def channel_credentials(ca_path: str | None) -> grpc.ChannelCredentials:
    """Client credentials trusting ca_path, or the system roots when None."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_path, "--tls-ca") if ca_path else None)
