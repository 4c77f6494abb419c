"""Connects the gateway to its tokenizers and engine replicas: encode on any live tokenizer, route each encoded
request to one replica (gateway/router.py), and keep every replica's liveness and load current.

Liveness: a load poller per replica calls GetLoad every `load_poll_interval_s`. A poll that fails with
UNAVAILABLE, or a replica's engine stream breaking, marks the replica down at once and ends its in-flight requests
with UNAVAILABLE. A poll that times out (1 s) marks it down for routing only: a slow engine keeps the requests it
has, a dead one breaks their stream by itself. The poller keeps probing a down replica and marks it up when
GetLoad answers; its streams are re-opened on its next request. When no replica is live a request is still sent
to one (it fails at once with UNAVAILABLE if that engine is really gone, and succeeds if it just came back).

Each time a replica comes up its EngineInfo is read again; the replicas' queue capacities (max_num_seqs +
max_waiting) give the gateway's automatic admission bound, reported to capacity_observer.
"""
from __future__ import annotations

import logging
import asyncio
from typing import Callable

import grpc

from gateway.admission import engines_bound
from gateway.bidi_stream import internal_channel_options
from gateway.config import GatewayConfig
from gateway.replica import Replica
from gateway.replica_admin import AllReplicasEngine
from gateway.request_handle import Chunk, Failure, RequestHandle, Submission, TextOptions
from gateway.router import ReplicaLoad, Router, prefix_block_keys
from gateway.tokenizer_pool import TokenizerPool
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb

_LOG = logging.getLogger("tandem.gateway.pipeline")

__all__ = ["Chunk", "Failure", "Pipeline", "RequestHandle", "Submission", "TextOptions"]

POLL_TIMEOUT_S = 1.0
DEFAULT_BLOCK_SIZE = 16   # the engine's; its EngineInfo.block_size wins when set


class Pipeline:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        options = internal_channel_options(config.max_request_bytes)
        self.tokenizers = TokenizerPool(config.tokenizer_addresses, options)
        self.replicas = [Replica(address, lambda i=i: self.tokenizers.stub_for(i), self._on_engine_lost, options)
                         for i, address in enumerate(config.engine_addresses)]
        self.router = Router(config.routing, config.routing_load_margin)
        self.engine_stub = AllReplicasEngine(self.live_replicas)   # the admin service forwards through it
        self.engine_info: epb.EngineInfo | None = None
        self.tokenizer_info: tpb.TokenizerInfo | None = None
        self._pollers: list[asyncio.Task] = []
        self._fallback = 0
        # Called with (replica name, EngineLoad) after every answered poll (the metrics read the routing's polls).
        self.load_observer: Callable[[str, epb.EngineLoad], None] | None = None
        # Called with engines_bound over the replicas whenever a replica's EngineInfo is read.
        self.capacity_observer: Callable[[int | None], None] | None = None

    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.live]

    async def start(self) -> None:
        """Waits until at least one engine and one tokenizer answer (the others join when they do), then polls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout_s
        while True:
            await asyncio.gather(*(self._poll_replica(r) for r in self.replicas),
                                 *(self.tokenizers.probe(i, POLL_TIMEOUT_S) for i in range(len(self.tokenizers.stubs))))
            live = self.live_replicas()
            if live and any(self.tokenizers.live):
                break
            if loop.time() > deadline:
                raise asyncio.TimeoutError("no engine replica and tokenizer answered")
            await asyncio.sleep(self.config.load_poll_interval_s)
        timeout = self.config.connect_timeout_s
        first = live[0]
        if first.info is None:   # its GetInfo failed as it came up; now a failure fails the start
            first.info = await first.engine.GetInfo(epb.EngineInfoRequest(), timeout=timeout)
            self._report_capacity()
        self.engine_info = first.info
        tok = next(i for i, up in enumerate(self.tokenizers.live) if up)
        self.tokenizer_info = await self.tokenizers.stubs[tok].GetInfo(tpb.TokenizerInfoRequest(), timeout=timeout)
        self._pollers = [asyncio.create_task(self._poll_forever(r), name=f"load-poller {r.name}")
                         for r in self.replicas]
        self._pollers.append(asyncio.create_task(self._probe_tokenizers_forever(), name="tokenizer-poller"))

    async def close(self) -> None:
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        for replica in self.replicas:
            await replica.close()
        await self.tokenizers.close()

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    # --- per-request API -------------------------------------------------------------------------------------------

    async def encode(self, prompt: str | None, chat: list[tuple[str, str]] | None, timeout: float | None,
                     *, max_tokens: int = 0, parse_special_tokens: bool = False) -> list[int]:
        """max_tokens > 0: a prompt of that many tokens or more is refused (INVALID_ARGUMENT) by the tokenizer.
        parse_special_tokens: a chat's special-token text becomes control tokens (see tokenizer_pool)."""
        return await self.tokenizers.encode(prompt, chat, timeout, max_tokens=max_tokens,
                                            parse_special_tokens=parse_special_tokens)

    async def decode(self, ids: list[int], skip_special_tokens: bool, timeout: float | None) -> str:
        return await self.tokenizers.decode(ids, skip_special_tokens, timeout)

    async def engine_load(self) -> epb.EngineLoad:
        """One live replica's load (the first replica's when none is live)."""
        replica = (self.live_replicas() or self.replicas)[0]
        return await replica.engine.GetLoad(epb.EngineLoadRequest(), timeout=5)

    def submit(self, sub: Submission) -> RequestHandle:
        """Routes the request to a replica and submits it there; handle.replica says which."""
        block_size = (self.engine_info.block_size if self.engine_info else 0) or DEFAULT_BLOCK_SIZE
        keys = prefix_block_keys(sub.prompt_ids, block_size, sub.cache_salt, sub.adapter)
        chosen = self.router.choose([self._load_of(r) for r in self.replicas], keys)
        if chosen is None:
            self._fallback += 1
            replica = self.replicas[self._fallback % len(self.replicas)]
        else:
            replica = next(r for r in self.replicas if r.name == chosen)
        return replica.submit(sub)

    def cancel(self, request_id: str) -> None:
        """Drops the request everywhere; idempotent."""
        for replica in self.replicas:
            replica.cancel(request_id)

    # --- liveness and load -----------------------------------------------------------------------------------------

    @staticmethod
    def _load_of(r: Replica) -> ReplicaLoad:
        total = r.load.kv_blocks_total
        others = max(0, r.load.num_running + r.load.num_waiting - r.in_flight_at_poll)
        return ReplicaLoad(r.name, live=r.live, in_flight=r.num_in_flight, others=others,
                           kv_usage=r.load.kv_blocks_used / total if total else 0.0)

    async def _poll_replica(self, replica: Replica) -> None:
        try:
            replica.load = await replica.engine.GetLoad(epb.EngineLoadRequest(), timeout=POLL_TIMEOUT_S)
            replica.in_flight_at_poll = replica.num_in_flight
        except grpc.aio.AioRpcError as e:
            if replica.live:
                self._mark_down(replica, f"load poll failed: {e.code().name} {e.details() or ''}".strip(),
                                end_requests=e.code() != grpc.StatusCode.DEADLINE_EXCEEDED)
            return
        if self.load_observer is not None:
            self.load_observer(replica.name, replica.load)
        if not replica.live:
            await self._read_info(replica)
            replica.live = True
            _LOG.info("engine replica %s is up", replica.name)

    async def _read_info(self, replica: Replica) -> None:
        """Re-reads a replica's EngineInfo as it comes up (a restarted engine may queue more or less); on failure the
        last answer stays."""
        try:
            replica.info = await replica.engine.GetInfo(epb.EngineInfoRequest(), timeout=POLL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            _LOG.warning("engine replica %s did not answer GetInfo: %s", replica.name, e.code().name)
            return
        self._report_capacity()

    def _report_capacity(self) -> None:
        if self.capacity_observer is not None:
            self.capacity_observer(engines_bound(r.info.max_num_seqs + r.info.max_waiting if r.info else None
                                                 for r in self.replicas))

    async def _poll_forever(self, replica: Replica) -> None:
        while True:
            await self._poll_replica(replica)
            await asyncio.sleep(self.config.load_poll_interval_s)

    async def _probe_tokenizers_forever(self) -> None:
        while True:
            await asyncio.gather(*(self.tokenizers.probe(i, POLL_TIMEOUT_S)
                                   for i in range(len(self.tokenizers.stubs))))
            await asyncio.sleep(self.config.load_poll_interval_s)

    def _mark_down(self, replica: Replica, why: str, end_requests: bool) -> None:
        replica.live = False
        replica.load = epb.EngineLoad()
        self.router.forget(replica.name)   # it may come back with an empty prefix cache
        _LOG.warning("engine replica %s is down: %s", replica.name, why)
        if end_requests:
            replica.fail_all(why)

    def _on_engine_lost(self, replica: Replica, why: str) -> None:
        if replica.live:
            self._mark_down(replica, f"engine stream broke: {why}", end_requests=False)  # the replica ended them
