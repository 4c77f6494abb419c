"""Rebuilds a grpc RpcMethodHandler around a new behaviour, keeping its kind and (de)serializers. Interceptors use
it to refuse a call or to observe one without knowing which RPC it is."""
from __future__ import annotations

import grpc


def wrap_handler(handler: grpc.RpcMethodHandler, unary_unary=None, unary_stream=None,
                 request_deserializer=None) -> grpc.RpcMethodHandler:
    """Replaces the behaviour of a unary-request handler: `unary_unary(behaviour)` / `unary_stream(behaviour)` must
    return the new behaviour (and request_deserializer, when given, the deserializer). Streaming-request handlers
    (none on the public API) pass through unchanged."""
    kw = dict(request_deserializer=request_deserializer or handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary is not None and unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary(handler.unary_unary), **kw)
    if handler.unary_stream is not None and unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_stream(handler.unary_stream), **kw)
    return handler


def abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                  trailing_metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends every call with `code` before the servicer runs."""
    async def refuse(request, context):
        await context.abort(code, message, trailing_metadata)

    async def refuse_stream(request, context):
        await context.abort(code, message, trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)
