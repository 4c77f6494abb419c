"""Runs the Engine in its own thread, apart from the gRPC event loop.

The loop thread owns all scheduler state, so nothing is locked: the servicer only puts commands into the inbox,
and the loop hands each step's outputs to the sink that submitted each request. Aborts are applied before the next
schedule, so an aborted request's KV blocks are free by the next step.

Request ids here are the engine's own (new_request_id()), never a client's text: the servicer maps each
session's ids onto them, so no client can name, collide with or read another request, nor with the ids of a
group's members that the scheduler derives from them.

No request can stop the loop: an exception in admitting one fails that request alone; one in a step fails the
requests the engine blames (see Engine.step); and a request the engine no longer knows that never had its last
output gets a FAILED one, so every admitted request ends with a result or an error.

A request whose grammar is still compiling is work the loop cannot advance: when it is all there is, the loop
sleeps on its inbox, and the compiler's wake-up (an empty command) brings it back.

LoRA admin commands (load, unload, list) go through the same inbox and answer through a reply callback, called on
the loop thread with the result or the exception. An unload answers once its adapter is drained and dropped (see
engine_svc.adapters), which is checked after every step.
"""
from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.core.scheduler import AdmissionError, RequestOutput
from engine_svc.core.spec_stats import SpecDecodeStats
from engine_svc.engine import Engine

_LOG = logging.getLogger("tandem.engine.loop")


class OutputSink(Protocol):
    def emit(self, outputs: list[RequestOutput]) -> list[str]:
        """Called from the loop thread with this sink's requests' outputs of one step. Must not block. Returns the
        requests whose output it could not send (it has ended them for its client); the loop stops them."""

    def reject(self, request_id: str, error: AdmissionError) -> None:
        """Called from the loop thread when a submitted request cannot be admitted."""


@dataclass(frozen=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: OutputSink
    priority: int
    cache_salt: str
    adapter: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


# Called on the loop thread with the command's result, or the exception it raised. Must not block.
Reply = Callable[[object], None]


@dataclass(frozen=True)
class _LoadAdapter:
    name: str
    path: str
    reply: Reply


@dataclass(frozen=True)
class _UnloadAdapter:
    name: str
    reply: Reply   # with (name, requests drained) once dropped


@dataclass(frozen=True)
class _ListAdapters:
    reply: Reply   # with a list of AdapterStatus


@dataclass(frozen=True)
class LoadSnapshot:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    steps: int
    kv_integrity_checks: int
    kv_integrity_failures: int
    host_kv_blocks_total: int = 0      # the host KV tier (--kv-offload-gb); 0 without one
    host_kv_blocks_used: int = 0
    host_kv_hits: int = 0              # blocks a prefix hit loaded back from the host tier
    host_kv_bytes_offloaded: int = 0
    host_kv_bytes_loaded: int = 0
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)   # a copy: the loop's own goes on


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.integrity_checks = 0
        self.integrity_failures = 0
        self._unload_replies: dict[str, list[Reply]] = {}
        self.load = self._snapshot()
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._ids = itertools.count()
        # A grammar compiled (on its pool thread): wake the loop, which may be waiting for nothing but that.
        engine.structured.wake = lambda: self._inbox.put(None)

    def new_request_id(self) -> str:
        """A fresh id for one request (thread-safe: count() is atomic in CPython). Digits only, while group
        members' ids contain '#', so they never collide."""
        return str(next(self._ids))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # Thread-safe entry points (called from the gRPC event loop).
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: OutputSink,
               priority: int = 0, cache_salt: str = "", adapter: str | None = None) -> None:
        self._inbox.put(_Submit(request_id, prompt_token_ids, params, sink, priority, cache_salt, adapter))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def load_adapter(self, name: str, path: str, reply: Reply) -> None:
        self._inbox.put(_LoadAdapter(name, path, reply))

    def unload_adapter(self, name: str, reply: Reply) -> None:
        self._inbox.put(_UnloadAdapter(name, reply))

    def list_adapters(self, reply: Reply) -> None:
        self._inbox.put(_ListAdapters(reply))

    # Loop thread only below.
    def _snapshot(self) -> LoadSnapshot:
        s, kv = self.engine.scheduler, self.engine.kv
        return LoadSnapshot(
            num_running=len(s.running), num_waiting=len(s.waiting), kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks, kv_blocks_free=kv.pool.num_free, kv_blocks_cached=kv.pool.num_cached_idle,
            prefix_cache_queries=kv.prefix_stats.queries, prefix_cache_hits=kv.prefix_stats.hits,
            num_preemptions=s.num_preemptions, steps=self.engine.num_steps,
            kv_integrity_checks=self.integrity_checks, kv_integrity_failures=self.integrity_failures,
            spec_decode=replace(s.spec_stats, accepted_per_pos=list(s.spec_stats.accepted_per_pos)),
            **dict(zip(("host_kv_blocks_total", "host_kv_blocks_used", "host_kv_hits", "host_kv_bytes_offloaded",
                        "host_kv_bytes_loaded"), self.engine.host_kv_stats())))

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Submit):
            self._admit(cmd)
        elif isinstance(cmd, _Abort):
            self.engine.abort(cmd.request_id)
            self._sinks.pop(cmd.request_id, None)
        else:
            self._apply_admin(cmd)

    def _admit(self, cmd: _Submit) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.priority,
                                    cmd.cache_salt, cmd.adapter)
        except AdmissionError as e:
            cmd.sink.reject(cmd.request_id, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug met by one request fails that request, not the engine
            _LOG.exception("request %s failed at admission", cmd.request_id)
            self.engine.abort(cmd.request_id)   # whatever it got before the error
            cmd.sink.emit([_failed(cmd.request_id, f"{type(e).__name__}: {e}")])
            return
        self._sinks[cmd.request_id] = cmd.sink

    def _apply_admin(self, cmd) -> None:
        # Whatever an admin command raises goes back to its caller: a bad adapter must never stop the loop.
        try:
            if isinstance(cmd, _LoadAdapter):
                cmd.reply(self.engine.load_adapter(cmd.name, cmd.path))
            elif isinstance(cmd, _ListAdapters):
                cmd.reply(self.engine.adapter_statuses())
            elif isinstance(cmd, _UnloadAdapter):
                self.engine.begin_unload_adapter(cmd.name)
                self._unload_replies.setdefault(cmd.name, []).append(cmd.reply)
                self._drop_drained_adapters()
        except Exception as e:  # noqa: BLE001 - handed to the caller, which maps it to a status
            cmd.reply(e)

    def _drop_drained_adapters(self) -> None:
        if not self._unload_replies:
            return
        try:
            dropped = self.engine.drop_drained_adapters()
        except Exception as e:  # noqa: BLE001 - the manager failed to free an adapter: tell the callers, go on
            _LOG.error("unloading an adapter failed: %s: %s", type(e).__name__, e)
            for replies in self._unload_replies.values():
                for reply in replies:
                    reply(e)
            self._unload_replies.clear()
            return
        for name, drained in dropped:
            for reply in self._unload_replies.pop(name, []):
                reply((name, drained))

    def _emit(self, outputs: list[RequestOutput]) -> None:
        by_sink: dict[int, tuple[OutputSink, list[RequestOutput]]] = {}
        for o in outputs:
            sink = self._sinks.pop(o.request_id, None) if o.last else self._sinks.get(o.request_id)
            if sink is not None:   # None: aborted while the step ran
                by_sink.setdefault(id(sink), (sink, []))[1].append(o)
        for sink, outs in by_sink.values():
            for rid in sink.emit(outs) or ():   # one request's unsendable output ends that request alone
                self._sinks.pop(rid, None)
                self.engine.abort(rid)

    def _end_orphans(self) -> None:
        """Guarantees every admitted request an end: one the engine has dropped without a last output (a bug, never
        the normal path) is failed here instead of leaving its client waiting forever."""
        orphans = [rid for rid in self._sinks if not self.engine.is_live(rid)]
        for rid in orphans:
            _LOG.error("request %s ended in the engine without a result; failing it", rid)
            self._sinks.pop(rid).emit([_failed(rid, "the engine ended the request without a result")])

    def _check_idle(self) -> None:
        # Cheap (one pass over the blocks) and only when the engine goes idle: a leak shows up at once, named.
        problems = self.engine.check_integrity()
        self.integrity_checks += 1
        if problems:
            self.integrity_failures += 1
            _LOG.error("KV cache integrity check failed when idle: %s", "; ".join(problems[:10]))
        self.load = self._snapshot()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(block=block)
            while True:
                if cmd is not None:
                    self._apply(cmd)
                cmd = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work() or self.engine.waits_for_grammars())
                self.load = self._snapshot()
                if self._stop.is_set() or not self.engine.has_work():
                    continue
                self._emit(self.engine.step())
                self._end_orphans()
                self._drop_drained_adapters()
                self.load = self._snapshot()
                if not self.engine.has_work() and self.engine.config.check_kv_integrity:
                    self._check_idle()
        except BaseException as e:  # a crashed loop must not leave clients hanging silently
            traceback.print_exc(file=sys.stderr)
            if self.on_fatal is not None:
                self.on_fatal(e)


def _failed(request_id: str, error: str) -> RequestOutput:
    return RequestOutput(request_id, [], FinishReason.FAILED, error=error, last=True)
