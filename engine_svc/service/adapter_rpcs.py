"""The engine's LoRA admin RPCs (load, unload, list): each is a command through the engine loop's inbox, answered
by the loop thread; the errors map to the statuses tandem.v1.Admin documents."""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc

from engine_svc.adapters import (AdapterExists, AdapterNotFound, AdapterStatus, InvalidAdapter, LoRANotEnabled,
                                 TooManyAdapters)
from engine_svc.service.engine_loop import Reply
from protos.tandem.internal.v1 import engine_pb2 as pb


def admin_status(error: Exception) -> grpc.StatusCode:
    if isinstance(error, LoRANotEnabled):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, AdapterNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, AdapterExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, TooManyAdapters):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (InvalidAdapter, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def adapter_info_to_pb(info, unloading: bool = False, num_requests: int = 0) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=info.name, path=info.path, rank=info.rank, alpha=info.alpha,
                          target_modules=list(info.target_modules), unloading=unloading, num_requests=num_requests)


class AdapterAdminRpcs:
    """Mixed into the EngineServicer, whose _ready(context) returns the running EngineLoop."""

    async def LoadAdapter(self, request, context) -> pb.AdapterInfo:
        loop = await self._ready(context)
        info = await _ask(context, lambda reply: loop.load_adapter(request.name, request.path, reply))
        return adapter_info_to_pb(info)

    async def UnloadAdapter(self, request, context) -> pb.UnloadAdapterResponse:
        loop = await self._ready(context)
        name, drained = await _ask(context, lambda reply: loop.unload_adapter(request.name, reply))
        return pb.UnloadAdapterResponse(name=name, num_drained_requests=drained)

    async def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        loop = await self._ready(context)
        statuses: list[AdapterStatus] = await _ask(context, loop.list_adapters)
        return pb.ListAdaptersResponse(adapters=[adapter_info_to_pb(s.info, s.unloading, s.num_requests)
                                                 for s in statuses])


async def _ask(context, send: Callable[[Reply], None]):
    """Sends one command to the loop and waits for its reply; an exception becomes the call's status."""
    aio = asyncio.get_running_loop()
    done = aio.create_future()

    def settle(result) -> None:
        if not done.done():   # the caller may have gone (cancel, deadline)
            done.set_result(result)

    send(lambda result: aio.call_soon_threadsafe(settle, result))
    result = await done
    if isinstance(result, Exception):
        await context.abort(admin_status(result), str(result))
    return result
