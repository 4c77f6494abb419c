"""Connects the gateway to the tokenizer and the engine and moves every request's data one way:

    submit -> engine Session stream -> (one message per engine step) -> tokenizer Detokenize stream
           -> (one message per step, all requests' text) -> the request's queue -> the client's stream

A stop string matched in the tokenizer, a client cancel or a deadline becomes an abort on the engine stream.
"""
from __future__ import annotations

import asyncio
import collections
import sys
from dataclasses import dataclass

import grpc

from gateway.bidi_stream import BidiStream, wait_ready
from gateway.config import GatewayConfig
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc

PROMPT_CONTEXT_TOKENS = 8   # prompt tail the detokenizer needs to decode the first new token as mid-text


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str


class Unavailable(Exception):
    pass


@dataclass(frozen=True)
class Chunk:
    """One step's text of one output, with the engine delta it came from (logprobs, cumulative logprob)."""
    index: int
    result: tpb.DetokResult
    delta: epb.RequestDelta


class RequestHandle:
    def __init__(self, request_id: str, prompt_ids: list[int], n: int) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()   # Chunk | Failure
        self.num_cached_tokens = 0                    # from the engine's first delta
        self.ended: set[int] = set()                  # outputs whose text has ended (pipeline side)
        self.ended_by_client: set[int] = set()        # of which the client has been sent the end
        self.engine_done = False                      # the engine sent the request's last delta

    def detok_id(self, index: int) -> str:
        """Each output has its own detokenizer state (text, stop strings)."""
        return self.request_id if self.n == 1 else f"{self.request_id}#{index}"


class Pipeline:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._engine_channel = grpc.aio.insecure_channel(config.engine)
        self._tok_channel = grpc.aio.insecure_channel(config.tokenizer)
        self._engine = engine_pb2_grpc.EngineStub(self._engine_channel)
        self._tok = tokenizer_pb2_grpc.TokenizerStub(self._tok_channel)
        self._engine_stream: BidiStream | None = None
        self._detok_stream: BidiStream | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._outputs: dict[str, tuple[RequestHandle, int]] = {}   # detokenizer id -> (request, output index)
        # One entry per Detokenize message sent, answered in order: the engine deltas it carried, by detok id.
        self._detok_sent: collections.deque[dict[str, epb.RequestDelta]] = collections.deque()
        self.engine_info: epb.EngineInfo | None = None
        self.engine_stub = self._engine   # unary engine calls (the admin service forwards through it)
        self.tokenizer_info: tpb.TokenizerInfo | None = None

    async def start(self) -> None:
        timeout = self.config.connect_timeout_s
        await asyncio.gather(wait_ready(self._engine_channel, timeout), wait_ready(self._tok_channel, timeout))
        self.engine_info = await self._engine.GetInfo(epb.EngineInfoRequest(), wait_for_ready=True, timeout=timeout)
        self.tokenizer_info = await self._tok.GetInfo(tpb.TokenizerInfoRequest(), wait_for_ready=True,
                                                      timeout=timeout)

    async def close(self) -> None:
        for stream in (self._engine_stream, self._detok_stream):
            if stream is not None:
                await stream.close()
        await self._engine_channel.close()
        await self._tok_channel.close()

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    # --- per-request API -------------------------------------------------------------------------------------------

    async def encode(self, prompt: str | None, chat: list[tuple[str, str]] | None, timeout: float | None) -> list[int]:
        if prompt is not None:
            req = tpb.EncodeRequest(text=prompt)
        else:
            req = tpb.EncodeRequest(chat=tpb.ChatTurns(turns=[tpb.ChatTurn(role=r, content=c) for r, c in chat]))
        resp = await self._tok.Encode(req, timeout=timeout)
        return list(resp.token_ids)

    async def decode(self, ids: list[int], skip_special_tokens: bool, timeout: float | None) -> str:
        resp = await self._tok.Decode(tpb.DecodeRequest(token_ids=ids, skip_special_tokens=skip_special_tokens),
                                      timeout=timeout)
        return resp.text

    async def engine_load(self) -> epb.EngineLoad:
        return await self._engine.GetLoad(epb.EngineLoadRequest(), timeout=5)

    def submit(self, request_id: str, prompt_ids: list[int], params: epb.SamplingParams,
               stop: tuple[str, ...], priority: int = 0, cache_salt: str = "", *,
               include_stop_str_in_output: bool = False, skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True, adapter: str = "") -> RequestHandle:
        """Opens each output's detokenizer state (with its text options), then submits it to the engine."""
        if request_id in self._handles:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        engine, _ = self._streams()
        handle = RequestHandle(request_id, prompt_ids, params.n or 1)
        self._handles[request_id] = handle
        opens = []
        for i in range(handle.n):
            self._outputs[handle.detok_id(i)] = (handle, i)
            opens.append(tpb.DetokOpen(
                request_id=handle.detok_id(i), stop=stop, skip_special_tokens=skip_special_tokens,
                prompt_token_ids=prompt_ids[-PROMPT_CONTEXT_TOKENS:],
                include_stop_str_in_output=include_stop_str_in_output,
                spaces_between_special_tokens=spaces_between_special_tokens))
        self._send_detok(tpb.DetokenizeInput(opens=opens))
        engine.send(epb.SessionInput(submits=[epb.Submit(request_id=request_id, prompt_token_ids=prompt_ids,
                                                         params=params, priority=priority,
                                                         cache_salt=cache_salt, adapter=adapter)]))
        return handle

    def cancel(self, request_id: str) -> None:
        """Drops the request everywhere; idempotent. The engine frees its KV blocks before its next step."""
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return
        if self._engine_stream is not None:
            self._engine_stream.send(epb.SessionInput(aborts=[request_id]))
        self._close_outputs(handle)

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
            self._engine_stream = BidiStream(self._engine.Session, self._on_engine_step,
                                             self._on_stream_closed, "engine")
        if self._detok_stream is None or self._detok_stream.closed:
            self._detok_sent.clear()
            self._detok_stream = BidiStream(self._tok.Detokenize, self._on_detok_output,
                                            self._on_stream_closed, "tokenizer")
        return self._engine_stream, self._detok_stream

    def _on_engine_step(self, step: epb.StepOutput) -> None:
        steps, deltas = [], {}
        for d in step.deltas:
            handle = self._handles.get(d.request_id)
            if handle is None:
                continue  # cancelled, or every output already ended by a stop string
            if d.finish == epb.ENGINE_FINISH_REJECTED:
                self._fail(d.request_id, Failure(_REJECT_STATUS.get(d.reject_code, grpc.StatusCode.INVALID_ARGUMENT),
                                                 d.error))
                continue
            handle.engine_done |= d.last
            if d.num_cached_tokens:
                handle.num_cached_tokens = d.num_cached_tokens
            if d.index in handle.ended:
                continue  # a stop string ended this output; the engine ends it with the others
            detok_id = handle.detok_id(d.index)
            deltas[detok_id] = d
            steps.append(tpb.DetokStep(request_id=detok_id, token_ids=d.token_ids, finish=d.finish,
                                       piece_token_ids=_piece_ids(d, handle.prompt_ids)))
        if steps:
            self._send_detok(tpb.DetokenizeInput(steps=steps), deltas)

    def _on_detok_output(self, out: tpb.DetokenizeOutput) -> None:
        deltas = self._detok_sent.popleft() if self._detok_sent else {}
        aborts = []
        for r in out.results:
            route = self._outputs.get(r.request_id)
            if route is None:
                continue
            handle, index = route
            handle.queue.put_nowait(Chunk(index, r, deltas.get(r.request_id, _NO_DELTA)))
            if r.finished:
                del self._outputs[r.request_id]
                handle.ended.add(index)
                if len(handle.ended) == handle.n and self._handles.pop(handle.request_id, None) is not None:
                    if not handle.engine_done:  # stop strings ended it: the engine is still generating
                        aborts.append(handle.request_id)
        if aborts and self._engine_stream is not None:
            self._engine_stream.send(epb.SessionInput(aborts=aborts))

    def _fail(self, request_id: str, failure: Failure) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.queue.put_nowait(failure)
            self._close_outputs(handle)

    def _on_stream_closed(self, error: BaseException | None) -> None:
        # Either stream breaking strands every request in flight: end them all with UNAVAILABLE and let the next
        # request open fresh streams.
        detail = getattr(error, "details", lambda: None)() or str(error or "stream ended")
        print(f"[gateway] internal stream closed: {detail}", file=sys.stderr, flush=True)
        for rid in list(self._handles):
            handle = self._handles.pop(rid)
            handle.queue.put_nowait(Failure(grpc.StatusCode.UNAVAILABLE, f"a backend service went away: {detail}"))
        self._outputs.clear()
        for stream in (self._engine_stream, self._detok_stream):
            if stream is not None and not stream.closed:
                asyncio.ensure_future(stream.close())


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
