"""Per-request grammar state and the token bitmask of a step's constrained rows.

A request's matcher follows its output tokens: before each mask it accepts the tokens the request has gained
since the last one. Its state is thus a function of the output alone, which is what keeps it right through
- asynchronous scheduling: the engine resolves a step in flight before it samples a constrained request, so
  every output token is real when the mask is made (a placeholder here is a bug, and fails the request);
- preemption and recompute: the output tokens are kept, so the matcher is too; were they ever shorter than what
  the matcher accepted, it rolls back to them;
- n > 1: each member of a group is its own request, with its own matcher;
- stop strings and aborts: the request ends, and forget_finished() drops its matcher.
Loop thread only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Container

import torch
import xgrammar as xgr

from engine_svc.core.request import PLACEHOLDER, Request


@dataclass
class _Follower:
    matcher: xgr.GrammarMatcher
    num_accepted: int = 0

    def follow(self, output: list[int]) -> None:
        """Raises ValueError when an output token is one the grammar does not allow."""
        if len(output) < self.num_accepted:
            self.matcher.rollback(self.num_accepted - len(output))
            self.num_accepted = len(output)
        for token in output[self.num_accepted:]:
            if token == PLACEHOLDER:
                raise ValueError("a constrained request's token is still pending when its mask is made")
            if not self.matcher.accept_token(token):
                raise ValueError(f"token {token} does not follow the request's grammar")
            self.num_accepted += 1


class GrammarMatchers:
    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self.vocab_size = vocab_size
        self._followers: dict[str, _Follower] = {}   # by the scheduler's request id (one per group member)
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        self._batch = xgr.BatchGrammarMatcher()

    def __len__(self) -> int:
        return len(self._followers)

    def fill(self, rows: list[tuple[int, Request, xgr.CompiledGrammar]]) -> tuple[torch.Tensor, list[int],
                                                                                  dict[str, str]]:
        """rows: (batch row, request, its compiled grammar) of each constrained row. Returns the host bitmask
        (int32 [rows of the batch, ceil(V / 32)]: only the listed rows are filled), the rows filled, and the
        requests whose output broke their grammar (API request id -> why), whose rows are left unmasked."""
        need = max(r for r, _, _ in rows) + 1
        if need > self._bitmask.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(need, self.vocab_size)
        matchers, filled, broken = [], [], {}
        for row, req, compiled in rows:
            f = self._followers.get(req.request_id)
            if f is None:
                f = self._followers[req.request_id] = _Follower(xgr.GrammarMatcher(compiled))
            try:
                f.follow(req.output_token_ids)
            except ValueError as e:
                broken[req.external_id] = str(e)
                continue
            matchers.append(f.matcher)
            filled.append(row)
        if matchers:
            self._batch.batch_fill_next_token_bitmask(matchers, self._bitmask, filled)
        return self._bitmask[:need], filled, broken

    def forget_finished(self, live: Container[str]) -> None:
        """Drops the matchers of requests whose id is not in live (finished, aborted, failed)."""
        for rid in [rid for rid in self._followers if rid not in live]:
            del self._followers[rid]
