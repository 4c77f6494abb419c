"""Runs the Engine in its own thread, apart from the gRPC event loop.

The loop thread owns all scheduler state, so nothing is locked: the servicer only puts commands into the inbox,
and the loop hands each step's outputs to the sink that submitted each request. Aborts are applied before the next
schedule, so an aborted request's KV blocks are free by the next step.
"""
from __future__ import annotations

import queue
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Protocol

from engine_svc.core.request import SamplingParams
from engine_svc.core.scheduler import AdmissionError, RequestOutput
from engine_svc.engine import Engine


class OutputSink(Protocol):
    def emit(self, outputs: list[RequestOutput]) -> None:
        """Called from the loop thread with this sink's requests' outputs of one step. Must not block."""

    def reject(self, request_id: str, error: AdmissionError) -> None:
        """Called from the loop thread when a submitted request cannot be admitted."""


@dataclass(frozen=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: OutputSink


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class LoadSnapshot:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    steps: int


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.load = self._snapshot()
        self.on_fatal: Callable[[BaseException], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # Thread-safe entry points (called from the gRPC event loop).
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: OutputSink) -> None:
        self._inbox.put(_Submit(request_id, prompt_token_ids, params, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # Loop thread only below.
    def _snapshot(self) -> LoadSnapshot:
        s, kv = self.engine.scheduler, self.engine.kv
        return LoadSnapshot(len(s.running), len(s.waiting), kv.num_blocks, kv.num_used_blocks, self.engine.num_steps)

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Submit):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
            except AdmissionError as e:
                cmd.sink.reject(cmd.request_id, e)
                return
            self._sinks[cmd.request_id] = cmd.sink
        elif isinstance(cmd, _Abort):
            self.engine.abort(cmd.request_id)
            self._sinks.pop(cmd.request_id, None)

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
                self._drain(block=not self.engine.has_work())
                self.load = self._snapshot()
                if self._stop.is_set() or not self.engine.has_work():
                    continue
                outputs = self.engine.step()
                by_sink: dict[int, tuple[OutputSink, list[RequestOutput]]] = {}
                for o in outputs:
                    sink = self._sinks[o.request_id] if o.finish_reason is None else self._sinks.pop(o.request_id)
                    by_sink.setdefault(id(sink), (sink, []))[1].append(o)
                for sink, outs in by_sink.values():
                    sink.emit(outs)
                self.load = self._snapshot()
        except BaseException as e:  # a crashed loop must not leave clients hanging silently
            traceback.print_exc(file=sys.stderr)
            if self.on_fatal is not None:
                self.on_fatal(e)
