"""Optional API keys on the public services: `authorization: Bearer <key>` metadata (the HTTP API: the same
header), else UNAUTHENTICATED (HTTP 401).

Keys come from a file (one per line; blank lines and `#` comments skipped) and/or the TANDEM_API_KEYS environment
variable (comma-separated). With no keys configured, authentication is off. Health and reflection stay open so
that load balancers and grpcurl can always probe. A key is never echoed back or logged.
"""
from __future__ import annotations

import hmac
import os
from typing import Iterable

import grpc

from gateway.rpc_wrap import abort_handler

ENV_VAR = "TANDEM_API_KEYS"
PROTECTED_PREFIXES = ("/tandem.v1.Generation/", "/tandem.v1.Admin/")
_BEARER = "bearer "


def load_api_keys(path: str | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Every configured key, file keys first. Raises ValueError for an unreadable file or a key with spaces."""
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {path}: {e.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    keys += [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    for i, key in enumerate(keys):
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ValueError(f"API key #{i + 1}: must be printable with no whitespace")
    return tuple(dict.fromkeys(keys))


def key_matches(presented: str, keys: Iterable[str]) -> bool:
    """Constant time in the presented key's content: every key is compared, and no comparison stops early."""
    candidate = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key.encode())
    return found


def check_metadata(metadata: Iterable[tuple[str, object]], keys: tuple[str, ...]) -> str | None:
    """None when the call may proceed, else the UNAUTHENTICATED message (which never contains the key)."""
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        return check_authorization(None, keys, "metadata")
    return check_authorization(values[0] if isinstance(values[0], str) else "", keys, "metadata")


def check_authorization(value: str | None, keys: tuple[str, ...], carrier: str) -> str | None:
    """The same check for gRPC metadata and an HTTP `Authorization` header (`carrier` names which in messages)."""
    if value is None:
        return f"missing API key: send {carrier} 'authorization: Bearer <key>'"
    if not value.lower().startswith(_BEARER):
        return f"malformed authorization {carrier}: expected 'Bearer <key>'"
    if not key_matches(value[len(_BEARER):].strip(), keys):
        return "invalid API key"
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIXES):
            return handler
        error = check_metadata(handler_call_details.invocation_metadata or (), self._keys)
        if error is None:
            return handler
        return abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, error)
