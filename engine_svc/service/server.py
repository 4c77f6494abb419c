"""The engine's gRPC service: per-gateway Session streams and a per-request debugging stream over one EngineLoop.

The gRPC server starts first and reports NOT_SERVING while the model loads; health turns SERVING once the engine
loop runs, which is what the launcher and compose wait for. Any stop (a signal, a dead engine loop, a dead
tensor-parallel worker) turns it NOT_SERVING first, then ends the open streams.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine_svc.adapters import UnknownAdapter
from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason
from engine_svc.core.scheduler import AdmissionError, RequestOutput
from engine_svc.service.adapter_rpcs import AdapterAdminRpcs
from engine_svc.service.engine_loop import EngineLoop
from engine_svc.service.proto_convert import (FINISH_TO_PB, check_cache_salt, check_prompt, load_to_pb,
                                              logprob_to_pb, params_from_pb)
from protos.reflection import enable_reflection
from protos.service_logging import setup_logging
from protos.tandem.internal.v1 import engine_pb2 as pb
from protos.tandem.internal.v1 import engine_pb2_grpc

_LOG = logging.getLogger("tandem.engine.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
_END = object()


class _QueueSink:
    """Hands loop-thread outputs to one asyncio consumer, thread-safely and without blocking the loop thread.

    The engine knows requests by its own ids; `names` maps each back to the id its session gave it. An entry is
    added before the request is submitted and removed by the consumer after its last delta, so an output the loop
    emits for a request aborted meanwhile finds no name and is dropped."""

    def __init__(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self._aio = aio_loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.names: dict[str, str] = {}

    # Queue items: lists of (engine id, delta); the engine id is None for a request refused before submission.

    def emit(self, outputs: list[RequestOutput]) -> list[str]:
        deltas, unsent = [], []
        for o in outputs:
            name = self.names.get(o.request_id)
            if name is None:
                continue
            try:
                deltas.append((o.request_id, _delta(o, name)))
            except Exception as e:  # noqa: BLE001 - e.g. an id a proto field cannot hold: that request fails alone
                _LOG.exception("request %s: its output cannot be sent", o.request_id)
                unsent.append(o.request_id)
                deltas.append((o.request_id, pb.RequestDelta(
                    request_id=name, finish=pb.ENGINE_FINISH_FAILED, last=True,
                    error=f"the engine could not send its output: {type(e).__name__}: {e}")))
        self._aio.call_soon_threadsafe(self.queue.put_nowait, deltas)
        return unsent

    def reject(self, request_id: str, error: AdmissionError) -> None:
        code = (pb.REJECT_NOT_FOUND if isinstance(error, UnknownAdapter) else
                pb.REJECT_NO_CAPACITY if error.no_capacity else pb.REJECT_INVALID)
        name = self.names.get(request_id)
        if name is not None:
            self._aio.call_soon_threadsafe(self.queue.put_nowait, [(request_id, _rejection(name, code, str(error)))])

    def refuse(self, name: str, message: str) -> None:
        """A request refused before it reached the engine (asyncio thread)."""
        self.queue.put_nowait([(None, _rejection(name, pb.REJECT_INVALID, message))])


def _delta(o: RequestOutput, name: str) -> pb.RequestDelta:
    d = pb.RequestDelta(request_id=name, token_ids=o.new_token_ids, finish=FINISH_TO_PB[o.finish_reason],
                        num_cached_tokens=o.num_cached_tokens or 0, index=o.index, last=o.last,
                        cumulative_logprob=o.cumulative_logprob or 0.0, error=o.error)
    if o.finish_reason is FinishReason.REJECTED:   # found invalid after admission (a grammar that does not compile)
        d.reject_code = pb.REJECT_INVALID
    if o.logprobs:
        d.logprobs.extend(logprob_to_pb(lp) for lp in o.logprobs)
    if o.prompt_logprobs:
        d.prompt_logprobs.extend(logprob_to_pb(lp) for lp in o.prompt_logprobs)
    return d


def _rejection(request_id: str, code: int, message: str) -> pb.RequestDelta:
    return pb.RequestDelta(request_id=request_id, finish=pb.ENGINE_FINISH_REJECTED, reject_code=code, error=message,
                           last=True)


_REJECT_STATUS = {pb.REJECT_NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
                  pb.REJECT_NOT_FOUND: grpc.StatusCode.NOT_FOUND}


class EngineServicer(AdapterAdminRpcs, engine_pb2_grpc.EngineServicer):
    def __init__(self) -> None:
        self.loop: EngineLoop | None = None

    async def _ready(self, context) -> EngineLoop:
        if self.loop is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is still loading its model")
        return self.loop

    def _admit(self, loop: EngineLoop, submit: pb.Submit, sink: _QueueSink) -> str | None:
        """Submits under a fresh engine id and returns it; None (with a rejection queued) for a bad request."""
        vocab = loop.engine.model_cfg.vocab_size
        try:
            if not submit.request_id:
                raise ValueError("request_id is empty")
            prompt = check_prompt(submit.prompt_token_ids, vocab)
            params = params_from_pb(submit.params, vocab)
            check_cache_salt(submit.cache_salt)
        except ValueError as e:
            sink.refuse(submit.request_id, str(e))
            return None
        engine_id = loop.new_request_id()
        sink.names[engine_id] = submit.request_id
        loop.submit(engine_id, prompt, params, sink, submit.priority, submit.cache_salt, submit.adapter or None)
        return engine_id

    async def GetInfo(self, request, context) -> pb.EngineInfo:
        loop = await self._ready(context)
        e = loop.engine
        return pb.EngineInfo(
            model_name=e.model_name, max_model_len=e.config.max_model_len, vocab_size=e.model_cfg.vocab_size,
            eos_token_ids=list(e.model_cfg.eos_token_ids), block_size=e.config.block_size,
            num_kv_blocks=e.kv.num_blocks, device=str(e.runner.device), dtype=str(e.runner.dtype).split(".")[-1],
            attention_backend=e.runner.backend.name, prefix_caching=e.config.enable_prefix_caching,
            max_num_batched_tokens=e.config.max_num_batched_tokens, max_num_seqs=e.config.max_num_seqs,
            max_waiting=e.config.max_waiting)

    async def GetLoad(self, request, context) -> pb.EngineLoad:
        loop = await self._ready(context)
        return load_to_pb(loop.load)

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.StepOutput]:
        loop = await self._ready(context)
        sink = _QueueSink(asyncio.get_running_loop())
        owned: dict[str, str] = {}   # this session's request ids in flight -> the engine's ids for them

        def forget(engine_id: str) -> None:
            name = sink.names.pop(engine_id, None)
            if owned.get(name) == engine_id:
                del owned[name]

        async def pump() -> None:
            try:
                async for msg in request_iterator:
                    for submit in msg.submits:
                        if submit.request_id in owned:
                            sink.refuse(submit.request_id,
                                        f"request_id {submit.request_id!r} is already in flight on this session")
                            continue
                        engine_id = self._admit(loop, submit, sink)
                        if engine_id is not None:
                            owned[submit.request_id] = engine_id
                    for rid in msg.aborts:
                        engine_id = owned.get(rid)
                        if engine_id is not None:
                            forget(engine_id)
                            loop.abort(engine_id)
            finally:
                sink.queue.put_nowait(_END)

        reader = asyncio.create_task(pump())
        inputs_done = False
        try:
            while not (inputs_done and not owned):
                item = await sink.queue.get()
                if item is _END:
                    inputs_done = True
                    continue
                for engine_id, d in item:
                    if d.last and engine_id is not None:
                        forget(engine_id)
                if item:
                    yield pb.StepOutput(deltas=[d for _, d in item])
        finally:
            reader.cancel()
            for engine_id in owned.values():  # the gateway went away: free everything it had in flight
                loop.abort(engine_id)

    async def GenerateIds(self, request, context) -> AsyncIterator[pb.RequestDelta]:
        loop = await self._ready(context)
        sink = _QueueSink(asyncio.get_running_loop())
        engine_id = self._admit(loop, request, sink)
        if engine_id is None:
            _, d = (await sink.queue.get())[0]
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, d.error)
        finished = False
        try:
            while not finished:
                for _, d in await sink.queue.get():
                    if d.finish == pb.ENGINE_FINISH_REJECTED:
                        await context.abort(_REJECT_STATUS.get(d.reject_code, grpc.StatusCode.INVALID_ARGUMENT),
                                            d.error)
                    if d.finish == pb.ENGINE_FINISH_FAILED:
                        await context.abort(grpc.StatusCode.INTERNAL, d.error)
                    finished = d.last
                    yield d
        finally:
            if not finished:
                loop.abort(engine_id)


def _load_in_daemon_thread(fn, aio_loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Runs a slow load off the event loop in a daemon thread, so a signal during the load can end the process
    at once (asyncio.to_thread's executor would make interpreter exit wait for the load to finish)."""
    fut = aio_loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # surfaced to the awaiting coroutine
            aio_loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
        else:
            aio_loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return fut


@dataclass
class _Running:
    """The engine service while it serves: its gRPC server and health, and why it must stop (a signal, the loop's
    fatal error, a worker rank's death), each of which sets `stop`."""
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    servicer: EngineServicer
    port: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: list[BaseException] = field(default_factory=list)
    worker_failure: list[str] = field(default_factory=list)

    def set_health(self, status) -> "asyncio.Future":
        return asyncio.gather(*(self.health.set(name, status) for name in ("", SERVICE_NAME)))


async def serve(config: EngineConfig) -> None:
    """Opens the port first (health answers NOT_SERVING while the model loads), loads the engine, serves until a
    signal or a failure, then shuts down; a failure ends the process non-zero."""
    setup_logging("engine", config.log_level, config.log_format)
    running = await _open_port(config)
    engine = await _load_engine(config, running)
    if engine is None:
        return
    loop = _start_loop(engine, running)
    await running.set_health(health_pb2.HealthCheckResponse.SERVING)
    _LOG.info("listening on %s:%d (%s, %s, %s)", config.host, running.port, engine.model_name, engine.runner.device,
              str(engine.runner.dtype).split(".")[-1])
    await running.stop.wait()
    await running.health.enter_graceful_shutdown()   # NOT_SERVING, whatever the cause
    await running.server.stop(grace=2.0)   # the streams still open end, so their requests fail over to the gateway
    loop.stop()
    _exit_on_failure(engine, running)


async def _open_port(config: EngineConfig) -> _Running:
    # A Session message carries whole prompts, and the gateway's channels take up to this much (gRPC's default of
    # 4 MiB would refuse a long prompt's submit and break the stream every request of that gateway shares).
    limit = 256 * 1024 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    servicer = EngineServicer()
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    running = _Running(server, health_servicer, servicer, server.add_insecure_port(f"{config.host}:{config.port}"))
    await running.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    aio_loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        aio_loop.add_signal_handler(sig, running.stop.set)
    return running


async def _load_engine(config: EngineConfig, running: _Running):
    """The loaded Engine, or None when a stop came first; a model that cannot load exits non-zero."""
    from engine_svc.engine import Engine  # imports torch: after the port is open so health answers early

    _LOG.info("loading %s ...", config.model)
    load = _load_in_daemon_thread(lambda: Engine(config), asyncio.get_running_loop())
    await asyncio.wait([load, asyncio.ensure_future(running.stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not load.done():  # stopped while loading: exit now; the daemon loader thread dies with the process
        await running.server.stop(0)
        return None
    try:
        return load.result()
    except Exception as e:  # a model that cannot load: one clear line, a non-zero exit, no hang
        _LOG.error("cannot load %s: %s: %s", config.model, type(e).__name__, e)
        await running.server.stop(0)
        raise SystemExit(1)


def _start_loop(engine, running: _Running) -> EngineLoop:
    """Starts the engine loop thread; its fatal error and a worker rank's death (the executor's monitor thread)
    both stop the service."""
    aio_loop = asyncio.get_running_loop()

    def stop_for(failures: list):
        def record(failure) -> None:
            failures.append(failure)
            aio_loop.call_soon_threadsafe(running.stop.set)
        return record

    loop = EngineLoop(engine)
    loop.on_fatal = stop_for(running.fatal)
    if hasattr(engine.executor, "on_failure"):
        engine.executor.on_failure = stop_for(running.worker_failure)
    loop.start()
    running.servicer.loop = loop
    return loop


def _exit_on_failure(engine, running: _Running) -> None:
    if running.worker_failure:
        # The ranks are out of step (one is gone, the others may wait in a collective for it), so the process group
        # cannot be torn down cleanly: the surviving workers are killed and the process ends here, non-zero, its
        # last line naming the rank and the cause.
        kill_workers = getattr(engine.executor, "kill_workers", None)
        if kill_workers is not None:
            kill_workers()
        _LOG.error(running.worker_failure[0])
        os._exit(1)
    if running.fatal:   # a crash is never a clean exit: the launcher (or compose) must see it and restart the engine
        fatal = running.fatal[0]
        _LOG.error("the engine loop died: %s: %s", type(fatal).__name__, fatal)
        raise SystemExit(1)
