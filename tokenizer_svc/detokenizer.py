"""The Detokenize stream's state: every open request of one stream, and one output message per input message."""
from __future__ import annotations

from tokenizers import Tokenizer

from protos.tandem.internal.v1 import tokenizer_pb2
from tokenizer_svc.pieces import TokenPieces
from tokenizer_svc.request_detok import RequestDetokenizer


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
        """Opens, then steps in order, then closes: a request may open and step in one message."""
        for o in message.opens:
            self.open(o.request_id, o.stop, o.skip_special_tokens, o.prompt_token_ids, o.include_stop_str_in_output,
                      o.spaces_between_special_tokens)
        out = tokenizer_pb2.DetokenizeOutput()
        add = out.results.add
        requests = self._requests
        for s in message.steps:
            request_id = s.request_id
            request = requests.get(request_id)
            if request is None:
                continue
            token_ids = s.token_ids
            text, consumed, finished, finish, matched_stop = request.step(token_ids, s.finish)
            piece_ids = s.piece_token_ids
            if not finished:  # the common case: only the fields that differ from their defaults
                if piece_ids:
                    add(request_id=request_id, text=text, token_ids=token_ids, pieces=self.pieces(piece_ids))
                else:
                    add(request_id=request_id, text=text, token_ids=token_ids)
                continue
            del requests[request_id]
            # Pieces answer every id asked for, also past a stop-string match: they describe alternatives.
            add(request_id=request_id, text=text,
                token_ids=token_ids if consumed == len(token_ids) else token_ids[:consumed],
                finished=True, finish=finish, matched_stop=matched_stop,
                pieces=self.pieces(piece_ids) if piece_ids else None)
        for request_id in message.closes:
            self.close(request_id)
        return out
