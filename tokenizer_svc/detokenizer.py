"""The Detokenize stream's state: every open request of one stream, and one output message per input message."""
from __future__ import annotations

import logging

from tokenizers import Tokenizer

from protos.tandem.internal.v1 import tokenizer_pb2
from tokenizer_svc.pieces import TokenPieces
from tokenizer_svc.request_detok import RequestDetokenizer

_LOG = logging.getLogger("tandem.tokenizer.detokenizer")


class Detokenizer:
    """Not thread-safe: one instance per Detokenize stream, driven by that stream's handler."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._requests: dict[str, RequestDetokenizer] = {}
        self._pieces: TokenPieces | None = None  # built on the first step that asks for pieces

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def open(self, request_id: str, stop=(), skip_special_tokens: bool = True, prompt_token_ids=(),
             include_stop_str_in_output: bool = False, spaces_between_special_tokens: bool = True) -> None:
        """Starts (or restarts) a request's state."""
        self._requests[request_id] = RequestDetokenizer(self._tokenizer, stop, skip_special_tokens, prompt_token_ids,
                                                        include_stop_str_in_output, spaces_between_special_tokens)

    def close(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def pieces(self, token_ids) -> list[str]:
        """Each token's own text (see pieces.py)."""
        if self._pieces is None:
            self._pieces = TokenPieces(self._tokenizer)
        return self._pieces(token_ids)

    def handle(self, message: tokenizer_pb2.DetokenizeInput) -> tokenizer_pb2.DetokenizeOutput:
        """Opens, then steps in order, then closes: a request may open and step in one message. A request whose
        open or step raises gets a finished result with the error, and the others go on (one stream serves them
        all)."""
        out = tokenizer_pb2.DetokenizeOutput()
        for o in message.opens:
            try:
                self.open(o.request_id, o.stop, o.skip_special_tokens, o.prompt_token_ids,
                          o.include_stop_str_in_output, o.spaces_between_special_tokens)
            except Exception as e:  # noqa: BLE001 - see the docstring
                self._fail(out, o.request_id, e)
        requests = self._requests
        for s in message.steps:
            request = requests.get(s.request_id)
            if request is None:
                continue
            try:
                self._step(out, request, s)
            except Exception as e:  # noqa: BLE001 - see the docstring
                self._fail(out, s.request_id, e)
        for request_id in message.closes:
            self.close(request_id)
        return out

    def _fail(self, out: tokenizer_pb2.DetokenizeOutput, request_id: str, error: Exception) -> None:
        _LOG.exception("detokenizing request %s failed", request_id)
        self._requests.pop(request_id, None)
        out.results.add(request_id=request_id, finished=True, error=f"{type(error).__name__}: {error}")

    def _step(self, out: tokenizer_pb2.DetokenizeOutput, request: RequestDetokenizer,
              s: tokenizer_pb2.DetokStep) -> None:
        add = out.results.add
        request_id, token_ids = s.request_id, s.token_ids
        text, consumed, finished, finish, matched_stop = request.step(token_ids, s.finish)
        piece_ids = s.piece_token_ids
        if not finished:  # the common case: only the fields that differ from their defaults
            if piece_ids:
                add(request_id=request_id, text=text, token_ids=token_ids, pieces=self.pieces(piece_ids))
            else:
                add(request_id=request_id, text=text, token_ids=token_ids)
            return
        pieces = self.pieces(piece_ids) if piece_ids else None
        del self._requests[request_id]
        # Pieces answer every id asked for, also past a stop-string match: they describe alternatives.
        kept = token_ids if consumed == len(token_ids) else token_ids[:consumed]
        add(request_id=request_id, text=text, token_ids=kept, finished=True, finish=finish, matched_stop=matched_stop,
            pieces=pieces)
