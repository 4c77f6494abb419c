"""The client's side of one request's reply: turns each Chunk that the replica delivers into the
GenerateStreamResponse the client is sent, adding logprob texts, the echo, finish reasons and, on the last
output's end, the usage.

It owns what the client has been sent (outputs started and ended, tokens counted); the RequestHandle it reads
stays its Replica's alone.
"""
from __future__ import annotations

from gateway.request_handle import Chunk, RequestHandle
from gateway.validation import ValidatedRequest
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

_ENGINE_FINISH = {
    epb.ENGINE_FINISH_STOP_TOKEN: api.FINISH_REASON_STOP,
    epb.ENGINE_FINISH_LENGTH: api.FINISH_REASON_LENGTH,
    epb.ENGINE_FINISH_ABORTED: api.FINISH_REASON_CANCELLED,
}


class ClientReply:
    def __init__(self, request_id: str, v: ValidatedRequest, handle: RequestHandle) -> None:
        self.request_id = request_id           # the client's label, echoed on every chunk
        self.v = v
        self.handle = handle
        self.echo: str | None = None           # the prompt's text, prefixed to each output's first chunk
        self.completion_tokens = 0
        self._started: set[int] = set()
        self._ended: set[int] = set()          # outputs whose end the client has been sent

    @property
    def complete(self) -> bool:
        return len(self._ended) == self.handle.n

    def chunk(self, item: Chunk) -> api.GenerateStreamResponse:
        r, d = item.result, item.delta
        prompt_ids = self.handle.prompt_ids
        self.completion_tokens += len(r.token_ids)
        chunk = api.GenerateStreamResponse(request_id=self.request_id, index=item.index, text=r.text,
                                           token_ids=r.token_ids)
        _add_logprobs(chunk, d, r, prompt_ids)
        if item.index not in self._started:
            self._started.add(item.index)
            if self.echo is not None:
                chunk.text = self.echo + chunk.text
                chunk.token_ids[:0] = prompt_ids
        if r.finished:
            self._ended.add(item.index)
            _finish(chunk, r)
            if self.v.logprobs is not None or self.v.best_of > 1:
                chunk.cumulative_logprob = d.cumulative_logprob
            if self.complete:
                chunk.usage.prompt_tokens = len(prompt_ids)
                chunk.usage.completion_tokens = self.completion_tokens
                chunk.usage.cached_prompt_tokens = self.handle.num_cached_tokens
        return chunk


def _finish(chunk: api.GenerateStreamResponse, r) -> None:
    if r.matched_stop:
        chunk.finish_reason = api.FINISH_REASON_STOP
        chunk.stop_string = r.matched_stop
        return
    chunk.finish_reason = _ENGINE_FINISH[r.finish]
    if r.finish == epb.ENGINE_FINISH_STOP_TOKEN and r.token_ids:
        chunk.stop_token_id = r.token_ids[-1]


def _add_logprobs(chunk: api.GenerateStreamResponse, d: epb.RequestDelta, r, prompt_ids: list[int]) -> None:
    """Engine logprobs with each token's text, read back from r.pieces in the order replica._piece_ids asked."""
    pieces = iter(r.pieces)

    def entry(lp) -> api.TokenLogprob:
        text = next(pieces)
        return api.TokenLogprob(token_id=lp.token_id, token=text, logprob=lp.logprob,
                                top=[api.TopLogprob(token_id=t, token=next(pieces), logprob=v)
                                     for t, v in zip(lp.top_token_ids, lp.top_logprobs)])

    entries = [entry(lp) for lp in d.logprobs]
    chunk.logprobs.extend(entries[:len(r.token_ids)])   # a stop string may have cut the step short
    if d.prompt_logprobs:
        chunk.prompt_logprobs.append(api.TokenLogprob(token_id=prompt_ids[0], token=next(pieces)))
        chunk.prompt_logprobs.extend(entry(lp) for lp in d.prompt_logprobs)
