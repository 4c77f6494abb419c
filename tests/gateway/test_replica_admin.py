"""LoRA admin calls across replicas, with fake engine stubs (no processes)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from gateway.replica_admin import AllReplicasEngine


class FakeEngine:
    def __init__(self, name: str, fail: grpc.StatusCode | None = None) -> None:
        self.name, self.fail, self.calls = name, fail, []

    def _answer(self, method: str, request):
        self.calls.append((method, request))
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), details=self.name)
        return f"{method} from {self.name}"

    async def LoadAdapter(self, request, timeout=None):
        return self._answer("LoadAdapter", request)

    async def UnloadAdapter(self, request, timeout=None):
        return self._answer("UnloadAdapter", request)

    async def ListAdapters(self, request, timeout=None):
        return self._answer("ListAdapters", request)


def fan_out(*engines: FakeEngine) -> AllReplicasEngine:
    return AllReplicasEngine(lambda: [SimpleNamespace(engine=e) for e in engines])


def test_load_and_unload_reach_every_replica_list_asks_one():
    a, b = FakeEngine("a"), FakeEngine("b")
    admin = fan_out(a, b)
    assert asyncio.run(admin.LoadAdapter("req", timeout=1)) == "LoadAdapter from a"
    assert asyncio.run(admin.UnloadAdapter("req2")) == "UnloadAdapter from a"
    assert asyncio.run(admin.ListAdapters("req3")) == "ListAdapters from a"
    assert a.calls == [("LoadAdapter", "req"), ("UnloadAdapter", "req2"), ("ListAdapters", "req3")]
    assert b.calls == [("LoadAdapter", "req"), ("UnloadAdapter", "req2")]


def test_a_failing_replica_status_reaches_the_caller():
    ok, bad = FakeEngine("ok"), FakeEngine("bad", grpc.StatusCode.ALREADY_EXISTS)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(fan_out(ok, bad).LoadAdapter("req"))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.ALREADY_EXISTS, "bad")
    assert ok.calls == [("LoadAdapter", "req")]   # not rolled back (documented)


def test_no_live_replica_is_unavailable():
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(fan_out().ListAdapters("req"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
