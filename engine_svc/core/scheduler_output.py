"""What one Scheduler.schedule() call hands the model runner (the requests of a step and the tokens each computes),
and the builder that fills it within the step's limits. Plain Python: no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine_svc.core.host_kv_tier import KVCopies
from engine_svc.core.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int          # first position computed this step (== num_computed_tokens before the step)
    samples: bool       # the step reaches the end of the known tokens, so its last logits pick the next token
    adapter: str | None = None   # the LoRA adapter the request runs with; None: the base model
    spec_token_ids: tuple[int, ...] = ()   # proposals verified after the request's last token (1 + k new tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    kv_copies: KVCopies = field(default_factory=KVCopies)   # host KV tier copies, run before the forward

    @property
    def adapters(self) -> set[str]:
        """The distinct adapters of the scheduled requests (at most max_loras)."""
        return {s.adapter for s in self.scheduled if s.adapter is not None}

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class BatchBuilder:
    """The batch one Scheduler.schedule() call builds, and what it may still take."""
    out: SchedulerOutput
    budget: int                  # tokens it may still grant
    max_rows: int
    in_flight: frozenset[str]    # request ids of the batches in flight: left out
    speculating: list[tuple[int, int]] = field(default_factory=list)   # (index in out.scheduled, k proposals)

    @property
    def is_open(self) -> bool:
        return self.budget > 0 and len(self.out.scheduled) < self.max_rows

    def grant(self, req: Request, num_new: int, num_proposals: int = 0) -> None:
        """req computes num_new tokens from its num_computed_tokens on; num_proposals more are reserved."""
        start = req.num_computed_tokens
        self.out.scheduled.append(ScheduledRequest(req, num_new, start, samples=start + num_new == req.num_tokens,
                                                   adapter=req.adapter))
        self.budget -= num_new + num_proposals
