"""The best_of samples of one API request, of which n are returned. Plain Python: no torch.

Member 0 computes the prompt alone. When it has (its first token is sampled), the other members join: each adopts
the prompt's full blocks from member 0 by reference (one more reference per member, nothing copied) and computes
only the prompt's last, partial block itself before sampling its own first token. Members are independent samples:
a seeded request gives member i its own seed derived from (seed, i).

With n == best_of every member streams its tokens as they come; with best_of > n nothing is sent until all members
have finished, then the n with the highest cumulative logprob are sent whole, re-indexed 0..n-1 by rank.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import Request, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from engine_svc.core.group_policy import GroupHost, MemberToken


def member_params(params: SamplingParams, index: int) -> SamplingParams:
    """Member 0 runs with the request's own params; the others draw from their own seed and leave the prompt's
    logprobs to member 0 (so they can share its blocks instead of scoring the prompt again)."""
    if index == 0:
        return params
    seed = None if params.seed is None else (params.seed + 0x9E3779B97F4A7C15 * index) & 0x7FFFFFFFFFFFFFFF
    return replace(params, seed=seed, prompt_logprobs=None)


class SampleGroup:
    """A GroupPolicy (engine_svc.core.group_policy): best_of independent samples, each member its own seat."""
    speculates = False        # members are ranked together by cumulative logprob
    chooses_tokens = False

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.members: list[Request] = []
        self.waiting_to_fork: list[Request] = []   # members 1.. until member 0 has computed the prompt
        self.num_unfinished = params.best_of
        self.streams = params.n == params.best_of
        self._prompt_logprobs: list[TokenLogprob] | None = None   # held back with the outputs (best_of > n)

    @classmethod
    def start(cls, template: Request) -> SampleGroup:
        """The group of template's API request: member 0 joins first, the others wait for its prompt."""
        group = cls(template.request_id, template.params)
        group.members = [template.member(f"{template.request_id}#{i}", member_params(template.params, i), group,
                                         index=i) for i in range(template.params.best_of)]
        group.waiting_to_fork = group.members[1:]
        return group

    @property
    def first(self) -> Request:
        return self.members[0]

    @property
    def done(self) -> bool:
        return self.num_unfinished == 0

    def seats(self, num_running: int) -> int:
        return num_running

    def on_token(self, req: Request, sampled: MemberToken, host: GroupHost) -> list[RequestOutput]:
        """Outputs to send for a member's new token (sampled.reason: the member just finished)."""
        if req is self.first and self.waiting_to_fork:   # member 0 has computed the prompt: the others may join
            for r in self.waiting_to_fork:
                host.enqueue(r)
            self.waiting_to_fork = []
        token, lp, reason, cached, prompt_lps = sampled
        if reason is not None:
            self.num_unfinished -= 1
        if self.streams:
            return [RequestOutput(self.request_id, [token], reason, cached, index=req.index,
                                  logprobs=[lp] if lp is not None and self.params.logprobs is not None else None,
                                  prompt_logprobs=prompt_lps,
                                  cumulative_logprob=req.cumulative_logprob if reason is not None else None,
                                  last=self.done)]
        if self.params.logprobs is not None and lp is not None:
            req.logprobs.append(lp)
        if prompt_lps:
            self._prompt_logprobs = prompt_lps
        return self._best_n() if self.done else []

    def _best_n(self) -> list[RequestOutput]:
        ranked = sorted(self.members, key=lambda r: (-r.cumulative_logprob, r.index))[:self.params.n]
        outs = []
        for rank, r in enumerate(ranked):
            outs.append(RequestOutput(
                self.request_id, r.output_token_ids, r.finish_reason, self.first.num_cached_tokens, index=rank,
                logprobs=list(r.logprobs) if self.params.logprobs is not None else None,
                prompt_logprobs=self._prompt_logprobs if rank == 0 else None,
                cumulative_logprob=r.cumulative_logprob, last=rank == len(ranked) - 1))
        return outs
