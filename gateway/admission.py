"""Admission of public generation calls: a bound on calls in flight, and the SIGTERM drain.

Past `max_in_flight` a call is refused at once with RESOURCE_EXHAUSTED and a `retry-after-ms` trailing hint, so
the gateway never queues without bound. While draining, every new public call is refused with UNAVAILABLE; the
calls already in flight may finish until the drain timeout, after which they are ended with UNAVAILABLE (their
handlers are cancelled, which aborts the work in the engine).

The bound is explicit (--max-in-flight) or automatic: then it is what the engines would queue, the sum over
replicas of max_num_seqs + max_waiting from their GetInfo (engines_bound), so a default stack never refuses a call
its engines would have taken. Until the engines answer, the automatic bound is PROVISIONAL_MAX_IN_FLIGHT.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Iterable

import grpc

from gateway.auth import PROTECTED_PREFIXES
from gateway.rpc_wrap import wrap_handler

RETRY_AFTER_KEY = "retry-after-ms"
LIMITED_METHODS = ("/tandem.v1.Generation/Generate", "/tandem.v1.Generation/GenerateStream")
DRAINING_MESSAGE = "draining: the server is shutting down; retry on another replica"
PROVISIONAL_MAX_IN_FLIGHT = 256   # the automatic bound before any engine reports its queue capacity

_LOG = logging.getLogger("tandem.gateway.admission")


def engines_bound(capacities: Iterable[int | None]) -> int | None:
    """The automatic bound over the replicas' queue capacities (max_num_seqs + max_waiting each; None where not
    known yet). A replica not known yet counts as the first known one (replicas of one stack share one
    configuration); None when none is known, or none reports a capacity (an engine older than those fields)."""
    capacities = list(capacities)
    known = [c for c in capacities if c]
    if not known:
        return None
    return sum(c or known[0] for c in capacities)


def retry_hint(retry_after_ms: int) -> tuple[tuple[str, str], ...]:
    """The trailing metadata sent with every RESOURCE_EXHAUSTED for capacity."""
    return ((RETRY_AFTER_KEY, str(retry_after_ms)),)


@dataclass(eq=False)
class _Entry:
    task: asyncio.Task | None
    evicted: bool = False


@dataclass
class Admission:
    max_in_flight: int | None      # None: automatic, set by follow_engines (PROVISIONAL_MAX_IN_FLIGHT until then)
    retry_after_ms: int
    draining: bool = False
    automatic: bool = field(init=False)
    _entries: set = field(default_factory=set)
    _idle: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.automatic = self.max_in_flight is None
        if self.automatic:
            self.max_in_flight = PROVISIONAL_MAX_IN_FLIGHT
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.retry_after_ms < 1:
            raise ValueError(f"retry_after_ms must be >= 1, got {self.retry_after_ms}")

    def follow_engines(self, bound: int | None) -> None:
        """Takes engines_bound's value as the bound, unless the bound is explicit or the engines gave none."""
        if self.automatic and bound and bound != self.max_in_flight:
            self.max_in_flight = bound
            _LOG.info("max_in_flight %d: the engines' max_num_seqs + max_waiting, over all replicas", bound)

    @property
    def in_flight(self) -> int:
        return len(self._entries)

    def refusal(self, limited: bool, needed: int = 1) -> tuple[grpc.StatusCode, str, tuple] | None:
        """Why a new call may not start (code, message, trailing metadata), or None. needed: the generations the
        call starts (an HTTP completions call may carry several prompts)."""
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, ()
        if limited and len(self._entries) + needed > self.max_in_flight:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"gateway at capacity: {len(self._entries)} requests in flight (max_in_flight "
                    f"{self.max_in_flight}); retry after {self.retry_after_ms} ms",
                    retry_hint(self.retry_after_ms))
        return None

    def enter(self) -> _Entry:
        entry = _Entry(asyncio.current_task())
        self._entries.add(entry)
        return entry

    def leave(self, entry: _Entry) -> None:
        self._entries.discard(entry)
        if not self._entries and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout_s: float) -> int:
        """Refuses new calls, waits up to timeout_s for the calls in flight, then ends the rest with UNAVAILABLE.
        Returns how many were ended that way."""
        self.draining = True
        self._idle = asyncio.Event()
        if self._entries:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        left = [e for e in self._entries if e.task is not None and not e.task.done()]
        for entry in left:
            entry.evicted = True
            entry.task.cancel()
        if left:
            await asyncio.wait([e.task for e in left], timeout=5.0)
        return len(left)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROTECTED_PREFIXES):
            return handler
        limited = method in LIMITED_METHODS
        admission = self.admission

        async def admit(context):
            refusal = admission.refusal(limited)
            if refusal is not None:
                await context.abort(*refusal)
            return admission.enter()

        async def evicted(context):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "draining: the server shut down before this request finished")

        def unary(behaviour):
            async def run(request, context):
                entry = await admit(context)
                try:
                    return await behaviour(request, context)
                except asyncio.CancelledError:
                    if entry.evicted:
                        await evicted(context)
                    raise
                finally:
                    admission.leave(entry)
            return run

        def stream(behaviour):
            async def run(request, context):
                entry = await admit(context)
                try:
                    async for response in behaviour(request, context):
                        yield response
                except asyncio.CancelledError:
                    if entry.evicted:
                        await evicted(context)
                    raise
                finally:
                    admission.leave(entry)
            return run

        return wrap_handler(handler, unary_unary=unary, unary_stream=stream)
