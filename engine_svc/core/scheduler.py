"""Continuous batching over a paged KV cache with chunked prefill and prefix caching. Plain Python: no torch.

Every request has token_ids and num_computed_tokens; each step grants each scheduled request some of the tokens it
still lacks K/V for. There is no separate prefill phase: a prompt is computed over as many steps as the token
budget (max_num_batched_tokens) needs, while running requests keep decoding. A request joins with the longest
cached prefix of its tokens already counted as computed.

Invariants after each schedule():
- every running request holds blocks for num_computed_tokens + its scheduled tokens;
- waiting and running are ordered by (priority, arrival); the last running request is the one preempted when
  blocks run out;
- every decoding running request is granted its token before any prefill chunk takes budget beyond it, so a long
  prompt never stalls the streams already running;
- a preempted request returns to waiting with its blocks freed and num_computed_tokens = 0, keeping its generated
  tokens, which are recomputed (or found in the prefix cache) when it is scheduled again;
- the running requests use at most max_loras distinct LoRA adapters (the base model is no adapter), so every
  step's adapters fit the device's adapter slots. A waiting request whose adapter would exceed that waits while
  the requests behind it, on the base model or on adapters already running, still join.
- a waiting request that is not ready (the engine's `is_ready` predicate: its grammar still compiling) is
  stepped over the same way: it keeps its place, and the requests behind it join.

Asynchronous scheduling (the engine launches step k+1 before it has read step k's sampled ids): schedule() counts
the scheduled tokens as computed at once, and mark_in_flight() appends a PLACEHOLDER for each token being sampled,
so the next schedule() can already grant that token's decode step (the model runner takes its id from the previous
step's sampled ids on the device). update() later writes the real id over the placeholder. Hence:
- a placeholder is only ever the last token of a request, and only the input of a one-token decode step;
- a request with a placeholder is never (re)admitted from waiting, and its blocks are offered to the prefix cache
  only once every token they hold is real;
- a request whose pending token will end it by length is not scheduled again; one that ends on EOS has had one
  more decode step launched, whose result update() drops.

Several batches in flight (pipeline parallelism: one per stage): schedule(in_flight=ids, max_rows=n) leaves out
the requests of the batches still in flight, so a request is in at most one of them, and caps the batch's rows so
that the running requests spread over the batches. A request in flight may still be preempted (or aborted): its
blocks are freed at once, the batch in flight writes its K/V there before any later batch can (every stage runs
batches in launch order), and update() applies its result as for a preempted request under asynchronous
scheduling.

Speculative decoding (num_speculative_tokens K > 0 and a proposer): a decoding request that speculates (see
speculates()) is granted 1 + k tokens: its last token and k <= K proposals, which are never in token_ids. Then:
- k never reaches past max_tokens or the context: the accepted run plus the target's token fit in both;
- schedule() counts only the last token as computed; update() adds the accepted proposals (their K/V, written by
  the verify step, are the target's own) and frees the blocks past the accepted tokens. The K/V slots of
  rejected proposals lie at positions >= num_computed_tokens, so they are overwritten before anything reads them,
  and no block is offered to the prefix cache before its tokens are accepted ones;
- a request that speculates never carries a placeholder: the engine resolves the step in flight before it
  schedules a step with such requests (asynchronous scheduling waits, as for penalties).
"""
from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from engine_svc.core.beam_search import BeamSearch
from engine_svc.core.host_kv_tier import KVCopies
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import PLACEHOLDER, FinishReason, Request, RequestStatus, SamplingParams, TokenLogprob
from engine_svc.core.request_group import RequestGroup, member_params
from engine_svc.core.spec_stats import SpecDecodeStats

_LOG = logging.getLogger("tandem.engine.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    max_waiting: int = 1024
    enable_chunked_prefill: bool = True
    max_loras: int | None = None   # distinct adapters among running requests; None: no limit
    num_speculative_tokens: int = 0   # K: proposals per decoding request and step (0: no speculation)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             "(a whole prompt must fit in one step)")


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


class AdmissionError(ValueError):
    """The request can never run on this engine."""

    def __init__(self, message: str, no_capacity: bool) -> None:
        super().__init__(message)
        self.no_capacity = no_capacity


class Proposer(Protocol):
    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        """At most k proposed next tokens for each (request, k), in order (fewer, or none, when unsure)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: frozenset[int],
                 is_ready: Callable[[Request], bool] = lambda _: True, proposer: Proposer | None = None) -> None:
        """is_ready: whether a waiting request may join now (the engine says no while its grammar compiles);
        proposer: proposes tokens for the requests that speculate (with num_speculative_tokens > 0)."""
        self.config = config
        self.proposer = proposer if config.num_speculative_tokens > 0 else None
        self.spec_stats = SpecDecodeStats()
        self.is_ready = is_ready
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self.groups: dict[str, RequestGroup | BeamSearch] = {}   # by API request id

    # --- admission and abort -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str = "", adapter: str | None = None) -> Request:
        """adapter must be loaded (the engine checks it): the scheduler only groups requests by it."""
        if request_id in self.requests or request_id in self.groups:
            raise AdmissionError(f"request id {request_id!r} is already in use", no_capacity=False)
        if params.best_of > self.config.max_num_seqs:
            raise AdmissionError(f"best_of (or the beam width) {params.best_of} exceeds the engine's max_num_seqs "
                                 f"{self.config.max_num_seqs}", no_capacity=False)
        n = len(prompt_token_ids)
        if n == 0:
            raise AdmissionError("prompt is empty", no_capacity=False)
        if n >= self.config.max_model_len:
            raise AdmissionError(
                f"prompt has {n} tokens; the model's context is {self.config.max_model_len} and leaves no room "
                f"to generate", no_capacity=False)
        # A request must fit alone at its longest, or preemption could never make room for it.
        longest = min(n + params.max_tokens, self.config.max_model_len)
        if self.kv.blocks_for_tokens(longest) > self.kv.num_blocks:
            raise AdmissionError(
                f"prompt + max_tokens reach {longest} tokens, which need {self.kv.blocks_for_tokens(longest)} KV "
                f"blocks; the whole cache has {self.kv.num_blocks}", no_capacity=True)
        if len(self.waiting) >= self.config.max_waiting:
            raise AdmissionError(
                f"the engine's waiting queue is full ({self.config.max_waiting} requests); retry later",
                no_capacity=True)
        prompt, arrival = list(prompt_token_ids), next(self._arrivals)
        group = None
        if params.use_beam_search:
            # Every beam must be able to reach the end of the round, so the search stops at the context's end.
            group = BeamSearch(request_id, replace(params, max_tokens=min(params.max_tokens, longest - n)),
                               self.eos_token_ids)
            req = Request(group.new_member_id(), prompt, group.member_params, arrival, priority, cache_salt,
                          adapter, external_id=request_id, group=group)
            group.beams = [(req, 0.0)]
        elif params.best_of > 1:
            group = RequestGroup(request_id, params)
            group.members = [Request(f"{request_id}#{i}", prompt, member_params(params, i), arrival, priority,
                                     cache_salt, adapter, external_id=request_id, index=i, group=group)
                             for i in range(params.best_of)]
            group.waiting_to_fork = group.members[1:]
            req = group.first
        else:
            req = Request(request_id, prompt, params, arrival, priority, cache_salt, adapter)
        if group is not None:
            self.groups[request_id] = group
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=_sort_key)
        return req

    def abort(self, request_id: str) -> bool:
        """request_id is the API's id: every member of its group goes."""
        return self._end(request_id, FinishReason.ABORTED)

    def fail(self, request_id: str, error: str) -> list[RequestOutput]:
        """Ends the API request after an error in its own processing: every member goes and its blocks are freed;
        its last output carries the error. The other requests are untouched."""
        if not self._end(request_id, FinishReason.FAILED):
            return []
        return [RequestOutput(request_id, [], FinishReason.FAILED, error=error, last=True)]

    def reject(self, request_id: str, error: str) -> list[RequestOutput]:
        """Ends the API request, found invalid after admission (its grammar does not compile): it never ran."""
        if not self._end(request_id, FinishReason.REJECTED):
            return []
        return [RequestOutput(request_id, [], FinishReason.REJECTED, error=error, last=True)]

    def is_live(self, request_id: str) -> bool:
        """The API request is admitted and has not ended (its last output is still to come)."""
        return request_id in self.groups or request_id in self.requests

    def _end(self, request_id: str, reason: FinishReason) -> bool:
        group = self.groups.pop(request_id, None)
        members = [r for r in group.members if r.request_id in self.requests] if group else \
            [self.requests[request_id]] if request_id in self.requests else []
        for req in members:
            self._drop(req, reason)
        return bool(members) or group is not None

    def _drop(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._finish(req, reason)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_integrity(self) -> list[str]:
        return self.kv.check_integrity([r for r in self.running if r.block_ids])

    def requests_by_adapter(self) -> dict[str, int]:
        """Unfinished API requests (waiting, running, or a group not yet done) per adapter they run on."""
        ids: dict[str, set[str]] = {}
        for r in self.requests.values():
            if r.adapter is not None:
                ids.setdefault(r.adapter, set()).add(r.external_id)
        for g in self.groups.values():
            for m in g.members:
                if m.adapter is not None:
                    ids.setdefault(m.adapter, set()).add(g.request_id)
        return {name: len(v) for name, v in ids.items()}

    def uses_adapter(self, name: str) -> bool:
        return name in self.requests_by_adapter()

    # --- scheduling ------------------------------------------------------------------------------------------------

    def schedule(self, in_flight: frozenset[str] = frozenset(), max_rows: int | None = None) -> SchedulerOutput:
        """in_flight: request ids of the batches in flight, left out of this one; max_rows: at most this many
        requests in the batch (None: max_num_seqs bounds it)."""
        out = SchedulerOutput()
        speculating: list[tuple[int, int]] = []   # (index in out.scheduled, most proposals it has room for)
        budget = self.config.max_num_batched_tokens
        rows = max_rows or self.config.max_num_seqs
        decodes_left = sum(1 for r in self.running if self._wants_decode(r))

        # Running requests first, in service order: they already hold blocks.
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < rows:
            req = self.running[i]
            if req.request_id in in_flight:
                i += 1
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining == 1 and not self._wants_decode(req):
                i += 1   # its pending token ends it by length: nothing more to compute
                continue
            if remaining == 1:
                decodes_left -= 1
                num_new = 1
                k = self._proposal_room(req, budget - decodes_left - 1)
                # Proposals only take blocks that are free, and leave one for each decode behind: they never
                # cause a preemption.
                extra = self.kv.blocks_for_tokens(req.num_tokens + k) - len(req.block_ids)
                if k and extra + decodes_left <= self.kv.num_free_blocks and self.kv.allocate_slots(req, 1 + k):
                    speculating.append((len(out.scheduled), k))
                    out.scheduled.append(self._scheduled(req, 1))
                    budget -= 1 + k
                    i += 1
                    continue
            else:
                # A prefill chunk leaves one token of budget for each decode behind it.
                num_new = min(remaining, budget - decodes_left)
                if num_new <= 0:
                    i += 1
                    continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                if victim is not req and self._wants_decode(victim):
                    decodes_left -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1

        # The proposals, before anyone joins: the blocks and budget taken for proposals not made go back first.
        if speculating:
            budget += self._add_proposals(out, speculating)

        # Then waiting requests join while seats, tokens and blocks allow, in service order. None joins after a
        # preemption this step: the blocks are short. One whose adapter would exceed max_loras is stepped over.
        seats = self._seats_used()
        adapters = {r.adapter for r in self.running if r.adapter is not None}
        i = 0
        while i < len(self.waiting) and not out.preempted and budget > 0 and len(out.scheduled) < rows:
            req = self.waiting[i]
            if req.has_placeholder or req.request_id in in_flight:
                break   # preempted while its last step ran: it can rejoin once that step's token is known
            if not (self._adapter_fits(req, adapters) and self.is_ready(req)):
                i += 1
                continue
            need = self._seats_needed(req)
            if seats + need > self.config.max_num_seqs:
                break
            hits, host_keys = self._prefix_blocks(req)
            num_cached = (len(hits) + len(host_keys)) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hits, host_keys):
                break
            self.waiting.pop(i)
            if req.adapter is not None:
                adapters.add(req.adapter)
            if req.num_cached_tokens is None:
                req.num_cached_tokens = num_cached
                if req.group is None or req is req.group.members[0]:   # siblings share, they do not look up
                    self.kv.record_lookup(req.num_prompt_tokens, min(num_cached, req.num_prompt_tokens))
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=_sort_key)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            seats += need
        for s in out.scheduled:   # the launched step computes them; later steps may rely on that (stream order)
            # A proposal counts as computed only once accepted (update()).
            s.request.num_computed_tokens = s.start + s.num_new_tokens - len(s.spec_token_ids)
        out.kv_copies = self.kv.take_copies()
        return out

    def speculates(self, req: Request) -> bool:
        """The request's decode steps propose tokens. Off for beam search and the other groups (n > 1, best_of >
        1), whose members' tokens are chosen or ranked together, and for structured output (its grammar's mask
        follows each token)."""
        return (self.proposer is not None and req.group is None and req.params.structured_output is None)

    def _proposal_room(self, req: Request, budget: int) -> int:
        """How many tokens a decoding request may propose now: K, fewer near max_tokens or the context's end (the
        accepted run and the target's token must fit), or the step's token budget; 0 when it does not
        speculate."""
        if not self.speculates(req):
            return 0
        return max(0, min(self.config.num_speculative_tokens, budget,
                          req.params.max_tokens - req.num_output_tokens - 1,
                          self.config.max_model_len - req.num_tokens - 1))

    def _add_proposals(self, out: SchedulerOutput, speculating: list[tuple[int, int]]) -> int:
        """Asks the proposer, then grants each speculating request its proposals; the blocks taken for more than
        it got go back. Returns the token budget they give back."""
        rows = [(out.scheduled[i].request, k) for i, k in speculating]
        unused = 0
        for (i, k), proposal in zip(speculating, self.proposer.propose(rows)):
            s = out.scheduled[i]
            proposal = tuple(proposal[:k])
            out.scheduled[i] = replace(s, num_new_tokens=1 + len(proposal), spec_token_ids=proposal)
            self.kv.free_tail(s.request, s.start + 1 + len(proposal))
            unused += k - len(proposal)
        return unused

    def mark_in_flight(self, out: SchedulerOutput) -> None:
        """Asynchronous scheduling: out was launched and its sampled ids are not known yet."""
        for s in out.scheduled:
            # A beam's next token is chosen by its group from the step's results, never sampled ahead; a verify
            # row's tokens are resolved before its request is scheduled again (the engine waits).
            if s.samples and not isinstance(s.request.group, BeamSearch) and not s.spec_token_ids:
                s.request.token_ids.append(PLACEHOLDER)

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int], logprobs: list | None = None,
               prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] | None = None,
               runs: dict[str, tuple[list[int], list[TokenLogprob] | None]] | None = None) -> list[RequestOutput]:
        """Applies one step's results. sampled_token_ids (and logprobs, when any row wanted them: a TokenLogprob
        or None per row) have one entry per scheduled request that samples, in order. prompt_logprobs maps a
        member's request_id to (first prompt position scored, entries) for its prompt rows of the step. runs
        maps each verify row's request_id to its new tokens (the accepted proposals, then the target's token)
        and their logprobs when asked."""
        self.kv.release_copies(out.kv_copies)
        samples = iter(sampled_token_ids)
        lps = iter(logprobs) if logprobs is not None else None
        outputs: list[RequestOutput] = []
        for s in out.scheduled:
            token = next(samples) if s.samples else None
            lp = next(lps) if s.samples and lps is not None else None
            if s.request.is_finished:
                continue  # aborted, failed, or ended on the step before, while this step ran; its blocks are free
            try:
                if s.spec_token_ids:
                    outputs += self._apply_run(s, *runs[s.request.request_id])
                    continue
                outputs += self._apply(s, token, lp, prompt_logprobs)
            except Exception as e:  # noqa: BLE001 - one request's failure must not reach the others
                _LOG.exception("request %s failed while applying a step's results", s.request.external_id)
                outputs += self.fail(s.request.external_id, f"{type(e).__name__}: {e}")
        return outputs

    def _apply(self, s: ScheduledRequest, token: int | None, lp: TokenLogprob | None,
               prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] | None) -> list[RequestOutput]:
        """One scheduled request's share of a step's results: the outputs it produces."""
        req = s.request
        if prompt_logprobs and req.request_id in prompt_logprobs:
            _add_prompt_logprobs(req, *prompt_logprobs[req.request_id])
        if token is None:
            self.kv.cache_full_blocks(req)
            return []
        if isinstance(req.group, BeamSearch):
            self.kv.cache_full_blocks(req)
            return self._advance_beams(req.group) if req.group.report(req, list(lp.top)) else []
        position = s.start + s.num_new_tokens
        if position < req.num_tokens:
            req.token_ids[position] = token   # over the placeholder mark_in_flight put there
        else:
            req.token_ids.append(token)
        if req.status is RequestStatus.RUNNING:
            self.kv.cache_full_blocks(req)
        if lp is not None:
            req.cumulative_logprob += lp.logprob
        reason = self._stop_reason(req, token, position)
        if reason is not None:
            self._drop(req, reason)
        num_outputs = position + 1 - req.num_prompt_tokens
        cached = req.num_cached_tokens if num_outputs == 1 else None
        prompt_lps = None
        if num_outputs == 1 and req.index == 0 and req.params.prompt_logprobs is not None:
            prompt_lps, req.prompt_logprobs = req.prompt_logprobs, []
        group = req.group
        if group is None:
            wants = req.params.logprobs is not None
            return [RequestOutput(
                req.external_id, [token], reason, cached, logprobs=[lp] if wants else None,
                prompt_logprobs=prompt_lps,
                cumulative_logprob=req.cumulative_logprob if wants and reason is not None else None,
                last=reason is not None)]
        if num_outputs == 1 and req is group.first:
            self._release_siblings(group)
        outputs = group.on_token(req, token, lp, reason, cached, prompt_lps)
        if group.num_unfinished == 0:
            del self.groups[group.request_id]
        return outputs

    def _apply_run(self, s: ScheduledRequest, tokens: list[int],
                   lps: list[TokenLogprob] | None) -> list[RequestOutput]:
        """A verify row's results: tokens are its accepted proposals, then the target's own token. A stop (or
        max_tokens) inside the run ends the request there; the tokens after it are dropped."""
        req = s.request
        num_accepted = len(tokens) - 1
        self.spec_stats.record(len(s.spec_token_ids), num_accepted)
        # K/V hold the last token and the accepted proposals; blocks past them held only rejected ones.
        req.num_computed_tokens = s.start + 1 + num_accepted
        self.kv.free_tail(req, req.num_computed_tokens)
        reason, emitted = None, 0
        for j, token in enumerate(tokens):
            req.token_ids.append(token)
            emitted += 1
            if lps is not None:
                req.cumulative_logprob += lps[j].logprob
            reason = self._stop_reason(req, token, s.start + 1 + j)
            if reason is not None:
                break
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
        self.kv.cache_full_blocks(req)
        if reason is not None:
            self._drop(req, reason)
        wants = req.params.logprobs is not None and lps is not None
        return [RequestOutput(
            req.external_id, tokens[:emitted], reason, logprobs=lps[:emitted] if wants else None,
            cumulative_logprob=req.cumulative_logprob if wants and reason is not None else None,
            last=reason is not None)]

    # --- groups ----------------------------------------------------------------------------------------------------

    def _release_siblings(self, group: RequestGroup) -> None:
        """Member 0 has computed the prompt: the others may join and share its blocks."""
        for r in group.waiting_to_fork:
            self.requests[r.request_id] = r
            bisect.insort(self.waiting, r, key=_sort_key)
        group.waiting_to_fork = []

    def _prefix_blocks(self, req: Request) -> tuple[list[int], list[bytes]]:
        """Blocks a joining request starts with: a running sibling's full prompt blocks (a group member), else
        its longest cached prefix; then the keys of the blocks after those that the host KV tier holds. Never for
        prompt logprobs not yet computed: they need every prompt row."""
        if req.params.prompt_logprobs is not None and req.num_prompt_logprobs < req.num_prompt_tokens - 1:
            return [], []
        group = req.group
        blocks = None
        if group is not None and req is not group.members[0] and group.members[0].status is RequestStatus.RUNNING:
            first = group.members[0]
            k = min((req.num_tokens - 1) // self.kv.block_size, req.num_prompt_tokens // self.kv.block_size,
                    first.num_computed_tokens // self.kv.block_size, len(first.block_ids))
            if k > 0:
                blocks = first.block_ids[:k]
        if blocks is None:
            blocks = self.kv.find_cached_blocks(req)
        return blocks, self.kv.find_host_blocks(req, len(blocks))

    def _seats_used(self) -> int:
        """Running requests, where a beam search in progress counts as its full width."""
        beams = [r for r in self.running if isinstance(r.group, BeamSearch)]
        widths = {id(r.group): r.group.width for r in beams}
        return len(self.running) - len(beams) + sum(widths.values())

    def _seats_needed(self, req: Request) -> int:
        if isinstance(req.group, BeamSearch):
            # Its width was counted already when a sibling beam runs; a round waits for every beam to report.
            return 0 if any(r.group is req.group for r in self.running) else req.group.width
        return 1

    def _advance_beams(self, group: BeamSearch) -> list[RequestOutput]:
        next_beams, done = group.advance()
        old = group.members
        if done:
            for r in old:
                self._drop(r, FinishReason.LENGTH)
            del self.groups[group.request_id]
            return group.outputs(old[0].num_cached_tokens if old else None)
        continuing, beams = set(), []
        for nb in next_beams:   # forks copy their parent's tokens before any parent takes its new token
            if id(nb.parent) in continuing:
                beams.append((self._fork(nb.parent, group), nb.token, nb.score))
            else:
                continuing.add(id(nb.parent))
                beams.append((nb.parent, nb.token, nb.score))
        for r in old:
            if id(r) not in continuing:
                self._drop(r, FinishReason.LENGTH)
        for r, token, _ in beams:
            r.token_ids.append(token)
        group.beams = [(r, score) for r, _, score in beams]
        return []

    def _fork(self, parent: Request, group: BeamSearch) -> Request:
        """A new beam on parent's tokens: its full computed blocks shared by reference, the rest recomputed."""
        child = Request(group.new_member_id(), parent.prompt_token_ids, group.member_params, parent.arrival,
                        parent.priority, parent.cache_salt, parent.adapter, external_id=group.request_id,
                        group=group)
        child.token_ids = list(parent.token_ids)
        child.num_cached_tokens = parent.num_cached_tokens
        self.requests[child.request_id] = child
        if parent.status is RequestStatus.RUNNING:
            self.kv.share_prefix(parent, child, parent.num_computed_tokens // self.kv.block_size)
            child.status = RequestStatus.RUNNING
            bisect.insort(self.running, child, key=_sort_key)
        else:
            bisect.insort(self.waiting, child, key=_sort_key)
        return child

    # --- internals -------------------------------------------------------------------------------------------------

    def _stop_reason(self, req: Request, token: int, position: int) -> FinishReason | None:
        p = req.params
        num_outputs = position + 1 - req.num_prompt_tokens
        stoppable = num_outputs > p.min_tokens   # the sampler already forbade these tokens before
        if stoppable and ((token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return FinishReason.STOP_TOKEN
        if num_outputs >= p.max_tokens or position + 1 >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _adapter_fits(self, req: Request, running_adapters: set[str]) -> bool:
        limit = self.config.max_loras
        return (req.adapter is None or limit is None or req.adapter in running_adapters
                or len(running_adapters) < limit)

    def _wants_decode(self, req: Request) -> bool:
        """The request's only uncomputed token is its last one and sampling after it may still be needed."""
        if req.num_tokens - req.num_computed_tokens != 1:
            return False
        return req.num_output_tokens < req.params.max_tokens and req.num_tokens < self.config.max_model_len

    @staticmethod
    def _scheduled(req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, num_new, start, samples=start + num_new == req.num_tokens, adapter=req.adapter)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=_sort_key)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]


def _sort_key(req: Request) -> tuple[int, int]:
    return req.sort_key


def _add_prompt_logprobs(req: Request, first_position: int, entries: list[TokenLogprob]) -> None:
    """Keeps the entries for prompt positions not scored before (a preempted request scores them again)."""
    skip = req.num_prompt_logprobs + 1 - first_position
    fresh = entries[max(0, skip):]
    req.prompt_logprobs.extend(fresh)
    req.num_prompt_logprobs += len(fresh)
