"""Beam search over the engine's requests, step for step the algorithm of Hugging Face transformers'
`generate(num_beams=W, do_sample=False)` (early_stopping=False), so the same beams come out with the same scores.
Plain Python: no torch.

Each live beam is a Request that decodes one token per round and reports the top K = max(2, 1 + #EOS) * W
(token, logprob) of its next position; a round ends when every live beam has reported. Then, over the candidates
(beam score + logprob, the K best overall):
- the W best that do not end (EOS, or the max_tokens-th token) are the next live beams, best first;
- among the W best candidates overall, those that end are finished hypotheses scored sum logprob / length **
  length_penalty (length counts generated tokens, EOS included); the W best finished hypotheses are kept;
- once W hypotheses are finished and the best live beam's score / current length ** length_penalty cannot beat the
  worst of them, nothing more is added and the search ends; it also ends when every candidate ends.
The n best finished hypotheses are returned, best first.

Blocks: a parent chosen once continues in place; each further child is a new Request that takes the parent's full
computed blocks by reference and recomputes only the partial last block (fewer than block_size tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import FinishReason, Request, SamplingParams

if TYPE_CHECKING:
    from engine_svc.core.group_policy import GroupHost, MemberToken

_NEG = -1.0e9   # transformers' stand-in for an impossible score


@dataclass(frozen=True)
class Hypothesis:
    score: float                # sum logprob / length ** length_penalty
    output_token_ids: list[int]
    sum_logprob: float
    ended_on_eos: bool


@dataclass(frozen=True)
class NextBeam:
    parent: Request
    token: int
    score: float                # sum of logprobs of the beam's output tokens (_NEG-shifted when it cannot go on)


class BeamSearch:
    """A GroupPolicy (engine_svc.core.group_policy) whose members are the live beams."""
    speculates = False        # a beam's next token is chosen by the round, from every beam's candidates
    chooses_tokens = True

    def __init__(self, request_id: str, params: SamplingParams, eos_token_ids: frozenset[int]) -> None:
        self.request_id = request_id
        self.params = params
        self.width = params.best_of
        self.eos = (frozenset() if params.ignore_eos else eos_token_ids) | params.stop_token_ids
        self.num_candidates = max(2, 1 + len(self.eos)) * self.width
        # What each beam's Request runs with: greedy, reporting the candidates' logprobs.
        self.member_params = replace(params, use_beam_search=False, n=1, best_of=1, logprobs=self.num_candidates,
                                     prompt_logprobs=None)
        self.beams: list[tuple[Request, float]] = []     # live beams, best first, with their scores
        self.finished: list[Hypothesis] = []             # at most width, best first
        self.num_generated = 0
        self.improvable = True
        self._reports: dict[int, list[tuple[int, float]]] = {}
        self._next_id = 0
        self.done = False

    @classmethod
    def start(cls, template: Request, eos_token_ids: frozenset[int], max_tokens: int) -> BeamSearch:
        """The search for template's API request, with at most max_tokens output tokens; its first beam holds the
        prompt."""
        search = cls(template.request_id, replace(template.params, max_tokens=max_tokens), eos_token_ids)
        search.beams = [(template.member(search.new_member_id(), search.member_params, search), 0.0)]
        return search

    def new_member_id(self) -> str:
        self._next_id += 1
        return f"{self.request_id}#beam{self._next_id - 1}"

    @property
    def members(self) -> list[Request]:
        return [r for r, _ in self.beams]

    def seats(self, num_running: int) -> int:
        """The full width while any beam runs: a round waits for every beam to report."""
        return self.width if num_running else 0

    def on_token(self, req: Request, sampled: MemberToken, host: GroupHost) -> list[RequestOutput]:
        """req's candidates are its step's top logprobs; the last beam to report ends the round."""
        return self._next_round(host) if self.report(req, list(sampled.lp.top)) else []

    def report(self, beam: Request, top: list[tuple[int, float]]) -> bool:
        """Records a beam's top candidates; True when the round is complete."""
        self._reports[id(beam)] = top
        return len(self._reports) == len(self.beams)

    def advance(self) -> tuple[list[NextBeam], bool]:
        """Ends the round: the next live beams, and whether the search is over."""
        cands = []
        for rank, (beam, score) in enumerate(self.beams):
            for token, lp in self._reports[id(beam)]:
                cands.append((score + lp, rank, beam, token))
        self._reports.clear()
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[:self.num_candidates]
        t = self.num_generated
        ends = [tok in self.eos or t + 1 >= self.params.max_tokens for _, _, _, tok in cands]

        running = sorted(((v + (_NEG if end else 0.0), i) for i, ((v, _, _, _), end) in enumerate(zip(cands, ends))),
                         key=lambda x: -x[0])[:self.width]
        next_beams = [NextBeam(cands[i][2], cands[i][3], v) for v, i in running]

        if self.improvable:
            for i in range(min(self.width, len(cands))):
                if ends[i]:
                    v, _, beam, tok = cands[i]
                    self.finished.append(Hypothesis(v / (t + 1) ** self.params.length_penalty,
                                                    beam.output_token_ids + [tok], v, tok in self.eos))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[self.width:]
        self.num_generated = t + 1
        best_live = next_beams[0].score / self.num_generated ** self.params.length_penalty
        # Until width hypotheses are finished any live beam can still enter (transformers' is_done), whatever the
        # scores: a finite stand-in here would end a search with nothing finished once scores pass it (a large
        # negative length_penalty scales them past any constant), and that request would never be answered.
        worst_done = self.finished[-1].score if len(self.finished) == self.width else -math.inf
        self.improvable = self.improvable and best_live > worst_done
        return next_beams, not self.improvable or all(ends)

    def outputs(self, num_cached_tokens: int | None) -> list[RequestOutput]:
        best = self.finished[:self.params.n]
        return [RequestOutput(self.request_id, h.output_token_ids,
                              FinishReason.STOP_TOKEN if h.ended_on_eos else FinishReason.LENGTH, num_cached_tokens,
                              index=i, cumulative_logprob=h.sum_logprob, last=i == len(best) - 1)
                for i, h in enumerate(best)]

    def _next_round(self, host: GroupHost) -> list[RequestOutput]:
        """Moves the beams to the next round's (forks for parents chosen more than once, the beams not chosen
        dropped); the outputs when the search is over."""
        next_beams, done = self.advance()
        old = self.members
        if done:
            for r in old:
                host.drop(r, FinishReason.LENGTH)
            self.done = True
            return self.outputs(old[0].num_cached_tokens if old else None)
        continuing, beams = set(), []
        for nb in next_beams:   # forks copy their parent's tokens before any parent takes its new token
            if id(nb.parent) in continuing:
                beams.append((self._fork(nb.parent, host), nb.token, nb.score))
            else:
                continuing.add(id(nb.parent))
                beams.append((nb.parent, nb.token, nb.score))
        for r in old:
            if id(r) not in continuing:
                host.drop(r, FinishReason.LENGTH)
        for r, token, _ in beams:
            r.token_ids.append(token)
        self.beams = [(r, score) for r, _, score in beams]
        return []

    def _fork(self, parent: Request, host: GroupHost) -> Request:
        """A new beam on parent's tokens: its full computed blocks shared by reference, the rest recomputed."""
        child = parent.member(self.new_member_id(), self.member_params, self)
        child.token_ids = list(parent.token_ids)
        child.num_cached_tokens = parent.num_cached_tokens
        host.fork(parent, child)
        return child
