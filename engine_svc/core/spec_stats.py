"""Counters of speculative decoding, with vLLM's spec_decode meanings. Plain Python: no torch."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0              # verify rows: a request that proposed at least one token in a step
    num_draft_tokens: int = 0        # tokens proposed (and verified)
    num_accepted_tokens: int = 0     # of which the target accepted
    accepted_per_pos: list[int] = field(default_factory=list)   # accepted at proposal position 0, 1, ...
    draft_time_s: float = 0.0        # time spent proposing (the draft model's forwards, or the n-gram lookups)
    step_time_s: float = 0.0         # time of the engine steps in all, proposing included
    num_proposal_errors: int = 0     # rows whose proposing raised: each decoded that step without proposals

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_proposed:
            self.accepted_per_pos += [0] * (num_proposed - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over proposed ones."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify row yields on average: the accepted proposals plus the target's own token (vLLM's
        mean acceptance length)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def draft_time_share(self) -> float:
        return self.draft_time_s / self.step_time_s if self.step_time_s else 0.0
