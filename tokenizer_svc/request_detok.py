"""Detokenization state of one request: incremental decode, stop strings, and the engine's finish."""
from __future__ import annotations

from typing import NamedTuple, Sequence

from tokenizers import Tokenizer

from protos.tandem.internal.v1 import engine_pb2
from tokenizer_svc.incremental import IncrementalDecoder
from tokenizer_svc.stop_strings import StopStringMatcher

FINISH_NONE = engine_pb2.ENGINE_FINISH_NONE
FINISH_STOP_TOKEN = engine_pb2.ENGINE_FINISH_STOP_TOKEN


class StepOutcome(NamedTuple):
    text: str              # safe to show: whole characters, no part of a stop string (unless stops are included)
    consumed: int          # how many of the step's token ids count; fewer than sent after a stop-string match
    finished: bool         # the request is over; its state must be dropped
    finish: int            # the engine's finish passed through, or FINISH_NONE when a stop string ended it
    matched_stop: str      # "" unless a stop string ended it


class RequestDetokenizer:
    __slots__ = ("_decoder", "_stops")

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 prompt_token_ids: Sequence[int] = (), include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True):
        self._decoder = IncrementalDecoder(tokenizer, prompt_token_ids, skip_special_tokens,
                                           spaces_between_special_tokens)
        # include_stop_str_in_output: a matched stop string ends the text instead of being cut (stop token ids are
        # not stop strings: their text stays out either way).
        self._stops = StopStringMatcher(stop, include_stop_str_in_output) if any(stop) else None

    def step(self, token_ids: Sequence[int], finish: int = FINISH_NONE) -> StepOutcome:
        """Consumes one engine step's new tokens. Once `finished` is returned, no further step is valid."""
        push = self._decoder.push
        if finish == FINISH_NONE and self._stops is None:  # the common case, kept lean: it runs per token
            text = push(token_ids[0]) if len(token_ids) == 1 else "".join([push(t) for t in token_ids])
            return StepOutcome(text, len(token_ids), False, FINISH_NONE, "")

        # A STOP_TOKEN finish ends with the EOS / stop token: its id counts, its text is never shown.
        n_text = len(token_ids) - 1 if finish == FINISH_STOP_TOKEN and token_ids else len(token_ids)
        stops = self._stops
        if stops is None:
            text = "".join([push(token_ids[k]) for k in range(n_text)]) + self._decoder.flush()
            return StepOutcome(text, len(token_ids), True, finish, "")

        parts = []
        for k in range(n_text):
            piece = push(token_ids[k])
            if piece:
                emit, matched = stops.feed(piece)
                parts.append(emit)
                if matched is not None:
                    return StepOutcome("".join(parts), k + 1, True, FINISH_NONE, matched)
        if finish == FINISH_NONE:
            return StepOutcome("".join(parts), len(token_ids), False, FINISH_NONE, "")
        emit, matched = stops.feed(self._decoder.flush())
        parts.append(emit)
        if matched is not None:
            return StepOutcome("".join(parts), len(token_ids), True, FINISH_NONE, matched)
        parts.append(stops.flush())  # the stream ended: held text can no longer become a stop string
        return StepOutcome("".join(parts), len(token_ids), True, finish, "")
