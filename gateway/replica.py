"""One engine replica: its channel, its Session stream, and the Detokenize stream on the tokenizer paired with it.

Data flow of each of its requests:

    submit -> engine Session stream -> (one message per engine step) -> tokenizer Detokenize stream
           -> (one message per step, all requests' text) -> the request's queue -> the client's stream

A stop string matched in the tokenizer, a client cancel or a deadline becomes an abort on the engine stream.
Either stream breaking ends every request of this replica with UNAVAILABLE; the streams are re-opened on the next
submit. An engine stream that breaks also marks the replica down (on_engine_lost); the load poller marks it up.
"""
from __future__ import annotations

import logging
import asyncio
import collections
from typing import Callable

import grpc

from gateway.bidi_stream import BidiStream
from gateway.request_handle import Chunk, Failure, RequestHandle, Submission
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc

_LOG = logging.getLogger("tandem.gateway.replica")

PROMPT_CONTEXT_TOKENS = 8   # prompt tail the detokenizer needs to decode the first new token as mid-text


class Replica:
    def __init__(self, address: str, tokenizer: Callable[[], tokenizer_pb2_grpc.TokenizerStub],
                 on_engine_lost: Callable[["Replica", str], None], channel_options: tuple = ()) -> None:
        self.name = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options)
        self.engine = engine_pb2_grpc.EngineStub(self.channel)
        self.live = False                       # set by the pipeline: start-up, the load poller, a broken stream
        self.load = epb.EngineLoad()            # the engine's last GetLoad answer
        self.info: epb.EngineInfo | None = None # its GetInfo answer when it last came up (None: not answered)
        self.in_flight_at_poll = 0              # this gateway's requests on it when that answer arrived
        self._tokenizer = tokenizer             # a live tokenizer's stub, preferring this replica's pair
        self._on_engine_lost = on_engine_lost
        self._engine_stream: BidiStream | None = None
        self._detok_stream: BidiStream | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._outputs: dict[str, tuple[RequestHandle, int]] = {}   # detokenizer id -> (request, output index)
        # One entry per Detokenize message sent, answered in order: the engine deltas it carried, by detok id.
        self._detok_sent: collections.deque[dict[str, epb.RequestDelta]] = collections.deque()

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    async def close(self) -> None:
        await self._close_streams()
        await self.channel.close()

    # --- per-request API -------------------------------------------------------------------------------------------

    def submit(self, sub: Submission) -> RequestHandle:
        """Opens each output's detokenizer state (with its text options), then submits it to the engine."""
        engine, _ = self._streams()
        handle = RequestHandle(sub.request_id, sub.prompt_ids, sub.params.n or 1)
        handle.replica = self.name
        self._handles[sub.request_id] = handle
        opens = []
        for i in range(handle.n):
            self._outputs[handle.detok_id(i)] = (handle, i)
            opens.append(tpb.DetokOpen(
                request_id=handle.detok_id(i), stop=sub.text.stop, skip_special_tokens=sub.text.skip_special_tokens,
                prompt_token_ids=sub.prompt_ids[-PROMPT_CONTEXT_TOKENS:],
                include_stop_str_in_output=sub.text.include_stop_str_in_output,
                spaces_between_special_tokens=sub.text.spaces_between_special_tokens))
        self._send_detok(tpb.DetokenizeInput(opens=opens))
        engine.send(epb.SessionInput(submits=[epb.Submit(request_id=sub.request_id, prompt_token_ids=sub.prompt_ids,
                                                         params=sub.params, priority=sub.priority,
                                                         cache_salt=sub.cache_salt, adapter=sub.adapter)]))
        return handle

    def cancel(self, request_id: str) -> None:
        """Drops the request everywhere; idempotent. The engine frees its KV blocks before its next step."""
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        if self._engine_stream is not None:
            self._engine_stream.send(epb.SessionInput(aborts=[request_id]))
        self._close_outputs(handle)

    def fail_all(self, detail: str) -> None:
        """Ends every request in flight here with UNAVAILABLE and drops both streams (re-opened on next submit)."""
        for rid in list(self._handles):
            handle = self._handles.pop(rid)
            handle.queue.put_nowait(Failure(grpc.StatusCode.UNAVAILABLE,
                                            f"a backend service went away ({self.name}): {detail}"))
        self._outputs.clear()
        asyncio.ensure_future(self._close_streams())

    def _close_streams(self) -> "asyncio.Future":
        # Detached synchronously, so a submit made before the close runs opens fresh streams, never these.
        streams = [s for s in (self._engine_stream, self._detok_stream) if s is not None]
        self._engine_stream = self._detok_stream = None
        return asyncio.gather(*(s.close() for s in streams))

    def _close_outputs(self, handle: RequestHandle) -> None:
        ids = [handle.detok_id(i) for i in range(handle.n) if self._outputs.pop(handle.detok_id(i), None)]
        if ids and self._detok_stream is not None and not self._detok_stream.closed:
            self._send_detok(tpb.DetokenizeInput(closes=ids))

    def _send_detok(self, msg: tpb.DetokenizeInput, deltas: dict[str, epb.RequestDelta] | None = None) -> None:
        _, detok = self._streams()
        self._detok_sent.append(deltas or {})
        detok.send(msg)

    # --- streams ---------------------------------------------------------------------------------------------------

    def _streams(self) -> tuple[BidiStream, BidiStream]:
        """(Re)opens the two long-lived streams; after a failure the next request reconnects."""
        if self._engine_stream is None or self._engine_stream.closed:
            self._engine_stream = BidiStream(self.engine.Session, self._on_engine_step,
                                             lambda e: self._on_stream_closed(e, engine=True), f"engine {self.name}")
        if self._detok_stream is None or self._detok_stream.closed:
            self._detok_sent.clear()
            self._detok_stream = BidiStream(self._tokenizer().Detokenize, self._on_detok_output,
                                            lambda e: self._on_stream_closed(e, engine=False),
                                            f"tokenizer for {self.name}")
        return self._engine_stream, self._detok_stream

    def _on_engine_step(self, step: epb.StepOutput) -> None:
        steps, deltas = [], {}
        for d in step.deltas:
            try:
                self._route_delta(d, steps, deltas)
            except Exception as e:  # noqa: BLE001 - one request's bad delta must not close the shared stream
                self._fail_internal(d.request_id, "handling the engine's output", e)
        if steps:
            self._send_detok(tpb.DetokenizeInput(steps=steps), deltas)

    def _route_delta(self, d: epb.RequestDelta, steps: list[tpb.DetokStep],
                     deltas: dict[str, epb.RequestDelta]) -> None:
        handle = self._handles.get(d.request_id)
        if handle is None:
            return  # cancelled, or every output already ended by a stop string
        if d.finish == epb.ENGINE_FINISH_REJECTED:
            self._fail(d.request_id, Failure(_REJECT_STATUS.get(d.reject_code, grpc.StatusCode.INVALID_ARGUMENT),
                                             d.error))
            return
        if d.finish == epb.ENGINE_FINISH_FAILED:
            self._fail(d.request_id, Failure(grpc.StatusCode.INTERNAL, f"the engine failed it: {d.error}"))
            return
        handle.engine_done |= d.last
        if d.num_cached_tokens:
            handle.num_cached_tokens = d.num_cached_tokens
        if d.index in handle.ended:
            return  # a stop string ended this output; the engine ends it with the others
        detok_id = handle.detok_id(d.index)
        deltas[detok_id] = d
        steps.append(tpb.DetokStep(request_id=detok_id, token_ids=d.token_ids, finish=d.finish,
                                   piece_token_ids=_piece_ids(d, handle.prompt_ids)))

    def _on_detok_output(self, out: tpb.DetokenizeOutput) -> None:
        deltas = self._detok_sent.popleft() if self._detok_sent else {}
        aborts = []
        for r in out.results:
            route = self._outputs.get(r.request_id)
            if route is None:
                continue
            handle, _ = route
            try:
                self._deliver(r, route, deltas, aborts)
            except Exception as e:  # noqa: BLE001 - one request's bad result must not close the shared stream
                self._fail_internal(handle.request_id, "handling the tokenizer's output", e)
        if aborts and self._engine_stream is not None:
            self._engine_stream.send(epb.SessionInput(aborts=aborts))

    def _deliver(self, r: tpb.DetokResult, route: tuple[RequestHandle, int], deltas: dict[str, epb.RequestDelta],
                 aborts: list[str]) -> None:
        handle, index = route
        if r.error:
            self._fail_internal(handle.request_id, "detokenizing", r.error)
            return
        handle.queue.put_nowait(Chunk(index, r, deltas.get(r.request_id, _NO_DELTA)))
        if r.finished:
            del self._outputs[r.request_id]
            handle.ended.add(index)
            if len(handle.ended) == handle.n and self._handles.pop(handle.request_id, None) is not None:
                if not handle.engine_done:  # stop strings ended it: the engine is still generating
                    aborts.append(handle.request_id)

    def _fail_internal(self, request_id: str, stage: str, error: object) -> None:
        """Ends one request with INTERNAL (stopping it in the engine) after an error of its own."""
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        _LOG.error("request %s failed while %s: %s", request_id, stage, detail)
        in_engine = request_id in self._handles
        self._fail(request_id, Failure(grpc.StatusCode.INTERNAL, f"{stage} failed: {detail}"))
        if in_engine and self._engine_stream is not None:
            self._engine_stream.send(epb.SessionInput(aborts=[request_id]))

    def _fail(self, request_id: str, failure: Failure) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.queue.put_nowait(failure)
            self._close_outputs(handle)

    def _on_stream_closed(self, error: BaseException | None, engine: bool) -> None:
        # Either stream breaking strands every request in flight here.
        detail = getattr(error, "details", lambda: None)() or str(error or "stream ended")
        which = "engine" if engine else "tokenizer"
        _LOG.warning("%s stream of replica %s closed: %s", which, self.name, detail)
        self.fail_all(detail)
        if engine:
            self._on_engine_lost(self, detail)


_NO_DELTA = epb.RequestDelta()
_REJECT_STATUS = {epb.REJECT_NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
                  epb.REJECT_NOT_FOUND: grpc.StatusCode.NOT_FOUND}


def _piece_ids(d: epb.RequestDelta, prompt_ids: list[int]) -> list[int]:
    """Tokens whose text the logprobs need, in the order the gateway reads them back: each output token and its
    alternatives, then the first prompt token and each scored prompt token with its alternatives."""
    ids: list[int] = []
    for lp in d.logprobs:
        ids.append(lp.token_id)
        ids.extend(lp.top_token_ids)
    if d.prompt_logprobs:
        ids.append(prompt_ids[0])
        for lp in d.prompt_logprobs:
            ids.append(lp.token_id)
            ids.extend(lp.top_token_ids)
    return ids
