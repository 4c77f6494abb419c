"""The engine's LoRA admin RPCs across every replica, shaped like an EngineStub so gateway/admin.py forwards
through it unchanged.

Load and unload go to every live replica at once (an adapter must be everywhere a request may be routed); the
first replica's answer is returned, and the first failure, if any, is raised as that replica's status. A partial
failure is not rolled back: the replicas that succeeded keep the change, and the client sees the error and may
retry (loading an adapter that is already there answers ALREADY_EXISTS from those replicas). List asks one live
replica: the replicas agree unless a partial failure or a restart made them differ. A replica that comes back
after a restart has only the adapters its own command line loads.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc

from gateway.replica import Replica


class _NoReplica(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                         details="no engine replica is live")


class AllReplicasEngine:
    def __init__(self, live_replicas: Callable[[], list[Replica]]) -> None:
        self._live = live_replicas

    def _replicas(self) -> list[Replica]:
        replicas = self._live()
        if not replicas:
            raise _NoReplica()
        return replicas

    async def _everywhere(self, method: str, request, timeout: float | None):
        results = await asyncio.gather(*(getattr(r.engine, method)(request, timeout=timeout)
                                         for r in self._replicas()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results[0]

    async def LoadAdapter(self, request, timeout: float | None = None):
        return await self._everywhere("LoadAdapter", request, timeout)

    async def UnloadAdapter(self, request, timeout: float | None = None):
        return await self._everywhere("UnloadAdapter", request, timeout)

    async def ListAdapters(self, request, timeout: float | None = None):
        return await self._replicas()[0].engine.ListAdapters(request, timeout=timeout)
