"""gRPC statuses as HTTP errors with OpenAI's error object: {"error": {"message", "type", "param", "code"}}.

The message is the gRPC API's, with gRPC field paths turned into the request's JSON names (openai_request.translate).
A capacity refusal (429) carries `Retry-After` in whole seconds and `retry-after-ms` (which the openai clients
read first), from the gateway's --retry-after-ms.
"""
from __future__ import annotations

import json
import math

import grpc
from aiohttp import web

from gateway.generation import RequestFailed
from gateway.openai_request import translate

# gRPC code -> (HTTP status, OpenAI error type, OpenAI error code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_at_capacity"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_SERVER_ERROR = (500, "server_error", None)


def error_body(code: grpc.StatusCode, message: str, names: dict[str, str] | None = None) -> tuple[int, dict]:
    """(HTTP status, error object) for a gRPC status and its message."""
    status, kind, err_code = _STATUS.get(code, _SERVER_ERROR)
    param = None
    if names is not None and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        message, param = translate(message, names)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": err_code}}


def error_response(code: grpc.StatusCode, message: str, names: dict[str, str] | None = None,
                   retry_after_ms: int | None = None, param: str | None = None) -> web.Response:
    status, body = error_body(code, message, names)
    if param is not None:
        body["error"]["param"] = param
    headers = {}
    if retry_after_ms is not None:
        headers = {"Retry-After": str(math.ceil(retry_after_ms / 1000)), "retry-after-ms": str(retry_after_ms)}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def failure_response(e: RequestFailed, names: dict[str, str]) -> web.Response:
    return error_response(e.code, e.message, names, e.retry_after_ms)
