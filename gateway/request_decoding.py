"""Request bytes that do not decode (random bytes, a corrupt wire format, bad UTF-8 in a string field) get
INVALID_ARGUMENT naming the message type, instead of gRPC's UNKNOWN from a deserializer that raised.

The deserializer is made lenient (it returns the decode error instead of raising it) and the behaviour refuses the
call before anything else runs. This interceptor must come first in the server's list, so its wrapper is the
outermost: its deserializer is the one gRPC calls, and its check runs before every other interceptor's behaviour."""
from __future__ import annotations

import grpc

from gateway.rpc_wrap import wrap_handler


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer):
    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's bad bytes
            return _Undecodable(e)
    return decode


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method

        async def refuse(request, context) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: the bytes sent to {method} are not a valid message "
                                f"({type(request.error).__name__}: {request.error})")

        def unary(behaviour):
            async def run(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await behaviour(request, context)
            return run

        def stream(behaviour):
            async def run(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for response in behaviour(request, context):
                    yield response
            return run

        return wrap_handler(handler, unary_unary=unary, unary_stream=stream,
                            request_deserializer=_lenient(handler.request_deserializer))
