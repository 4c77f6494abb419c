"""The scheduler's share of speculative decoding: which decoding requests propose, how many tokens, the blocks
they take, and what an accepted run counts as. Plain Python: no torch.

With num_speculative_tokens K > 0 and a proposer, a decoding request that speculates is granted 1 + k tokens: its
last token and k <= K proposals, which are never in token_ids. Then:
- k never reaches past max_tokens or the context: the accepted run plus the target's token fit in both;
- the scheduler counts only the last token as computed; accept() adds the accepted proposals (their K/V, written
  by the verify step, are the target's own) and frees the blocks past the accepted tokens. The K/V slots of
  rejected proposals lie at positions >= num_computed_tokens, so they are overwritten before anything reads them,
  and no block is offered to the prefix cache before its tokens are accepted ones;
- a request that speculates never carries a placeholder: the engine resolves the step in flight before it
  schedules a step with such requests (asynchronous scheduling waits, as for penalties);
- a proposer that raises for a request costs that request its proposals for the step, nothing more: it decodes
  one token as without speculation, and the other rows keep theirs (a batched call that raises is retried row by
  row to find the row that fails).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Protocol

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import Request
from engine_svc.core.scheduler_output import ScheduledRequest
from engine_svc.core.spec_stats import SpecDecodeStats

_LOG = logging.getLogger("tandem.engine.speculation")


class Proposer(Protocol):
    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        """At most k proposed next tokens for each (request, k), in order (fewer, or none, when unsure)."""


class Speculation:
    def __init__(self, proposer: Proposer | None, num_speculative_tokens: int, max_model_len: int,
                 kv: KVCacheManager) -> None:
        self.proposer = proposer if num_speculative_tokens > 0 else None
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.kv = kv
        self.stats = SpecDecodeStats()
        self._reported: weakref.WeakSet[Request] = weakref.WeakSet()   # proposing raised for them (logged once)

    def speculates(self, req: Request) -> bool:
        """The request's decode steps propose tokens. Off for groups whose members' tokens are chosen or ranked
        together (n > 1, best_of > 1, beam search), and for structured output (its grammar's mask follows each
        token)."""
        return (self.proposer is not None and (req.group is None or req.group.speculates)
                and req.params.structured_output is None)

    def reserve(self, req: Request, budget: int, decodes_behind: int) -> int:
        """Takes the blocks for a decoding request's last token and k proposals, and returns k: at most K, fewer
        near max_tokens or the context's end, at most budget. 0, taking nothing, when it does not speculate or the
        blocks would leave fewer free than the decodes behind it need: proposals never cause a preemption."""
        if not self.speculates(req):
            return 0
        k = max(0, min(self.num_speculative_tokens, budget, req.params.max_tokens - req.num_output_tokens - 1,
                       self.max_model_len - req.num_tokens - 1))
        extra = self.kv.blocks_for_tokens(req.num_tokens + k) - len(req.block_ids)
        if k and extra + decodes_behind <= self.kv.num_free_blocks and self.kv.allocate_slots(req, 1 + k):
            return k
        return 0

    def grant(self, scheduled: list[ScheduledRequest], speculating: list[tuple[int, int]]) -> int:
        """Asks the proposer for the rows reserved ((index in scheduled, k)) and grants each its proposals; the
        blocks taken for more than it got go back. Returns the token budget they give back."""
        rows = [(scheduled[i].request, k) for i, k in speculating]
        unused = 0
        for (i, k), proposal in zip(speculating, self._propose(rows)):
            s = scheduled[i]
            scheduled[i] = replace(s, num_new_tokens=1 + len(proposal), spec_token_ids=proposal)
            self.kv.free_tail(s.request, s.start + 1 + len(proposal))
            unused += k - len(proposal)
        return unused

    def accept(self, s: ScheduledRequest, num_accepted: int) -> None:
        """A verify row's first num_accepted proposals are accepted: they count as computed, and the blocks past
        them, which held only rejected ones, go back."""
        req = s.request
        self.stats.record(len(s.spec_token_ids), num_accepted)
        req.num_computed_tokens = s.start + 1 + num_accepted
        self.kv.free_tail(req, req.num_computed_tokens)

    def _propose(self, rows: list[tuple[Request, int]]) -> list[tuple[int, ...]]:
        """Each row's proposals: none for a row whose proposing raises."""
        if len(rows) > 1:
            try:
                return self._ask(rows)
            except Exception:  # noqa: BLE001 - one row's failure must not cost the others their proposals
                _LOG.debug("a batched proposal raised; proposing row by row", exc_info=True)
        return [self._propose_alone(row) for row in rows]

    def _propose_alone(self, row: tuple[Request, int]) -> tuple[int, ...]:
        try:
            return self._ask([row])[0]
        except Exception:  # noqa: BLE001 - see _propose
            self.stats.num_proposal_errors += 1
            req = row[0]
            if req not in self._reported:
                self._reported.add(req)
                _LOG.exception("proposing tokens for request %s raised; it decodes without speculation whenever "
                               "it does (logged once per request)", req.external_id)
            return ()

    def _ask(self, rows: list[tuple[Request, int]]) -> list[tuple[int, ...]]:
        """The proposer's answer for rows, cut to each row's k; raises unless it answers every row with ids."""
        proposals = self.proposer.propose(rows)
        if len(proposals) != len(rows):
            raise ValueError(f"the proposer answered {len(proposals)} rows for {len(rows)}")
        return [tuple(int(t) for t in p[:k]) for p, (_, k) in zip(proposals, rows)]
