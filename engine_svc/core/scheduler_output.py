"""What one Scheduler.schedule() call hands the model runner: the requests of a step and the tokens each
computes. Plain Python: no torch."""
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
