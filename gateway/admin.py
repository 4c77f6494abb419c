"""The public tandem.v1.Admin service: LoRA adapters, forwarded to the engine, which owns them. The engine's status
(NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION) and message reach the client unchanged."""
from __future__ import annotations

import grpc

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import admin_pb2 as api
from protos.tandem.v1 import admin_pb2_grpc

SERVICE_NAME = api.DESCRIPTOR.services_by_name["Admin"].full_name


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, engine: engine_pb2_grpc.EngineStub) -> None:
        self._engine = engine

    async def LoadAdapter(self, request, context) -> api.AdapterInfo:
        info = await self._forward(context, self._engine.LoadAdapter,
                                   epb.LoadAdapterRequest(name=request.name, path=request.path))
        return _info(info)

    async def UnloadAdapter(self, request, context) -> api.UnloadAdapterResponse:
        # Waits for the requests still on the adapter to finish: only the client's deadline bounds it.
        resp = await self._forward(context, self._engine.UnloadAdapter, epb.UnloadAdapterRequest(name=request.name))
        return api.UnloadAdapterResponse(name=resp.name, num_drained_requests=resp.num_drained_requests)

    async def ListAdapters(self, request, context) -> api.ListAdaptersResponse:
        resp = await self._forward(context, self._engine.ListAdapters, epb.ListAdaptersRequest())
        return api.ListAdaptersResponse(adapters=[_info(a) for a in resp.adapters])

    @staticmethod
    async def _forward(context, rpc, request):
        try:
            return await rpc(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or f"engine: {e.code().name}")


def _info(a: epb.AdapterInfo) -> api.AdapterInfo:
    return api.AdapterInfo(name=a.name, path=a.path, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
                           unloading=a.unloading, num_requests=a.num_requests)
