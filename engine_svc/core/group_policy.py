"""The one interface between the scheduler and the groups that serve one API request with several member requests
(n/best_of samples: engine_svc.core.request_group; beam search: engine_svc.core.beam_search). Plain Python: no
torch.

The scheduler treats every member as a request of its own (queues, blocks, preemption) and asks the group only:
- how many of the engine's seats it holds while some of its members run (seats);
- whether its members may propose tokens (speculates), and whether it picks their next tokens itself instead of
  the sampler (chooses_tokens);
- what a member's new token means: on_token() returns the outputs to send, and may add members (GroupHost.enqueue,
  GroupHost.fork: they share the prompt's, or their parent's, full blocks by reference) or end them
  (GroupHost.drop);
- whether the API request is over (done): then the scheduler forgets the group.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Protocol

from engine_svc.core.beam_search import BeamSearch
from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import FinishReason, Request, RequestStatus, TokenLogprob
from engine_svc.core.request_group import SampleGroup


class MemberToken(NamedTuple):
    """A member's sampled token as the scheduler applied it. With chooses_tokens the scheduler applies nothing:
    only token and lp are set."""
    token: int
    lp: TokenLogprob | None
    reason: FinishReason | None = None           # the member ended with this token
    cached: int | None = None                    # prompt tokens found cached, with the member's first token
    prompt_lps: list[TokenLogprob] | None = None   # the prompt's logprobs, with member 0's first token


class GroupHost(Protocol):
    """What a group may do to the scheduler's queues (the scheduler implements it)."""

    def enqueue(self, req: Request) -> None:
        """A new member waits to join; when it does it shares a running member's full prompt blocks."""

    def fork(self, parent: Request, child: Request) -> None:
        """child, a new member on parent's tokens, takes parent's full computed blocks by reference and runs beside
        it (or waits, when parent waits)."""

    def drop(self, req: Request, reason: FinishReason) -> None:
        """The member ends: it leaves its queue and its blocks are freed."""


class GroupPolicy(Protocol):
    request_id: str      # the API request's id
    speculates: bool     # members may propose tokens (speculative decoding)
    # The group, not the sampler, picks its members' next tokens from the candidates each reports: a member's
    # row never carries a placeholder, and the engine has a step's results before it schedules the next.
    chooses_tokens: bool

    @property
    def members(self) -> list[Request]:
        """The members that may still run or wait (ended ones may be among them)."""

    @property
    def done(self) -> bool:
        """The API request's last output has been returned."""

    def seats(self, num_running: int) -> int:
        """Seats (of max_num_seqs) the group holds while num_running of its members run."""

    def on_token(self, req: Request, sampled: MemberToken, host: GroupHost) -> list[RequestOutput]:
        """The outputs to send for member req's new token."""


def start_group(template: Request, eos_token_ids: frozenset[int], max_model_len: int) -> GroupPolicy | None:
    """The group that serves template's API request (its first member to join is members[0]); None when one
    request serves it."""
    p = template.params
    if p.use_beam_search:
        # Every beam must be able to reach the end of the round, so the search stops at the context's end.
        return BeamSearch.start(template, eos_token_ids, min(p.max_tokens, max_model_len - template.num_prompt_tokens))
    if p.best_of > 1:
        return SampleGroup.start(template)
    return None


def chooses_tokens(req: Request) -> bool:
    """req's group picks its next token (see GroupPolicy.chooses_tokens)."""
    return req.group is not None and req.group.chooses_tokens


def seats_used(running: list[Request]) -> int:
    """Seats the running requests hold: one each, a group's members as many as their group says."""
    per_group = Counter(r.group for r in running if r.group is not None)
    return sum(r.group is None for r in running) + sum(g.seats(n) for g, n in per_group.items())


def seats_needed(req: Request, running: list[Request]) -> int:
    """The seats req takes by joining the running requests."""
    group = req.group
    if group is None:
        return 1
    num_running = sum(1 for r in running if r.group is group)
    return group.seats(num_running + 1) - group.seats(num_running)


def prompt_donor(req: Request) -> Request | None:
    """The running member whose full prompt blocks req, a member joining after it, shares by reference."""
    group = req.group
    if group is None or req is group.members[0] or group.members[0].status is not RequestStatus.RUNNING:
        return None
    return group.members[0]
