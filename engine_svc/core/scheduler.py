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

Groups (n/best_of samples, beam search): each member is a request of its own here; its group, behind the
interface of engine_svc.core.group_policy, says what its tokens mean, adds and ends members, and how many seats
it holds. Speculative decoding: engine_svc.core.speculation grants a verify row 1 + k tokens, of which only the
last counts as computed until update() accepts proposals.
"""
from __future__ import annotations

import bisect
import itertools
import logging
from typing import Callable

from engine_svc.core.group_policy import (GroupPolicy, MemberToken, chooses_tokens, prompt_donor, seats_needed,
                                         seats_used, start_group)
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import PLACEHOLDER, FinishReason, Request, RequestStatus, SamplingParams, TokenLogprob
from engine_svc.core.scheduler_config import AdmissionError, SchedulerConfig, check_request
from engine_svc.core.scheduler_output import BatchBuilder, ScheduledRequest, SchedulerOutput
from engine_svc.core.spec_stats import SpecDecodeStats
from engine_svc.core.speculation import Proposer, Speculation

_LOG = logging.getLogger("tandem.engine.scheduler")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: frozenset[int],
                 is_ready: Callable[[Request], bool] = lambda _: True, proposer: Proposer | None = None) -> None:
        """is_ready: whether a waiting request may join now (the engine says no while its grammar compiles);
        proposer: proposes tokens for the requests that speculate (with num_speculative_tokens > 0)."""
        self.config = config
        self.spec = Speculation(proposer, config.num_speculative_tokens, config.max_model_len, kv)
        self.is_ready = is_ready
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self.groups: dict[str, GroupPolicy] = {}   # by API request id

    @property
    def proposer(self) -> Proposer | None:
        return self.spec.proposer

    @property
    def spec_stats(self) -> SpecDecodeStats:
        return self.spec.stats

    # --- admission and abort -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str = "", adapter: str | None = None) -> Request:
        """adapter must be loaded (the engine checks it): the scheduler only groups requests by it."""
        if request_id in self.requests or request_id in self.groups:
            raise AdmissionError(f"request id {request_id!r} is already in use", no_capacity=False)
        check_request(self.config, self.kv, len(prompt_token_ids), params)
        if len(self.waiting) >= self.config.max_waiting:
            raise AdmissionError(
                f"the engine's waiting queue is full ({self.config.max_waiting} requests); retry later",
                no_capacity=True)
        req = Request(request_id, list(prompt_token_ids), params, next(self._arrivals), priority, cache_salt, adapter)
        group = start_group(req, self.eos_token_ids, self.config.max_model_len)
        if group is not None:
            self.groups[request_id] = group
            req = group.members[0]
        self.enqueue(req)
        return req

    def abort(self, request_id: str) -> bool:
        """request_id is the API's id: every member of its group goes."""
        return self._end(request_id, FinishReason.ABORTED)

    def fail(self, request_id: str, error: str) -> list[RequestOutput]:
        """Ends the API request after an error in its own processing: every member goes and its blocks are freed;
        its last output carries the error. The other requests are untouched."""
        return self._end_with_error(request_id, FinishReason.FAILED, error)

    def reject(self, request_id: str, error: str) -> list[RequestOutput]:
        """Ends the API request, found invalid after admission (its grammar does not compile): it never ran."""
        return self._end_with_error(request_id, FinishReason.REJECTED, error)

    def _end_with_error(self, request_id: str, reason: FinishReason, error: str) -> list[RequestOutput]:
        if not self._end(request_id, reason):
            return []
        return [RequestOutput(request_id, [], reason, error=error, last=True)]

    def is_live(self, request_id: str) -> bool:
        """The API request is admitted and has not ended (its last output is still to come)."""
        return request_id in self.groups or request_id in self.requests

    def _end(self, request_id: str, reason: FinishReason) -> bool:
        group = self.groups.pop(request_id, None)
        members = [r for r in group.members if r.request_id in self.requests] if group else \
            [self.requests[request_id]] if request_id in self.requests else []
        for req in members:
            self.drop(req, reason)
        return bool(members) or group is not None

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

    # --- what groups do to the queues (group_policy.GroupHost) ----------------------------------------------------

    def enqueue(self, req: Request) -> None:
        """A new request, or group member, waits to join."""
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=_sort_key)

    def fork(self, parent: Request, child: Request) -> None:
        """child (a new member on parent's tokens) runs beside parent on its full computed blocks, shared by
        reference, or waits when parent waits."""
        if parent.status is not RequestStatus.RUNNING:
            self.enqueue(child)
            return
        self.requests[child.request_id] = child
        self.kv.share_prefix(parent, child, parent.num_computed_tokens // self.kv.block_size)
        child.status = RequestStatus.RUNNING
        bisect.insort(self.running, child, key=_sort_key)

    def drop(self, req: Request, reason: FinishReason) -> None:
        """req ends: it leaves its queue and its blocks are freed."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self.kv.free(req)
        if req.has_placeholder:   # the step launched after the last real token (async): it is never applied
            req.token_ids.pop()
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    # --- scheduling ------------------------------------------------------------------------------------------------

    def schedule(self, in_flight: frozenset[str] = frozenset(), max_rows: int | None = None) -> SchedulerOutput:
        """in_flight: request ids of the batches in flight, left out of this one; max_rows: at most this many
        requests in the batch (None: max_num_seqs bounds it)."""
        batch = BatchBuilder(SchedulerOutput(), self.config.max_num_batched_tokens,
                             max_rows or self.config.max_num_seqs, in_flight)
        self._continue_running(batch)
        # The proposals, before anyone joins: the blocks and budget taken for proposals not made go back first.
        if batch.speculating:
            batch.budget += self.spec.grant(batch.out.scheduled, batch.speculating)
        if not batch.out.preempted:   # none joins after a preemption this step: the blocks are short
            self._admit_waiting(batch)
        for s in batch.out.scheduled:   # the launched step computes them; later steps may rely on that (stream order)
            # A proposal counts as computed only once accepted (update()).
            s.request.num_computed_tokens = s.start + s.num_new_tokens - len(s.spec_token_ids)
        batch.out.kv_copies = self.kv.take_copies()
        return batch.out

    def _continue_running(self, batch: BatchBuilder) -> None:
        """Running requests first, in service order: they already hold blocks. Every decode is granted its token
        (and the proposals it has room for) before a prefill chunk takes budget beyond it."""
        decodes_left = sum(1 for r in self.running if self._wants_decode(r))
        i = 0
        while i < len(self.running) and batch.is_open:
            req = self.running[i]
            i += 1
            remaining = req.num_tokens - req.num_computed_tokens
            if req.request_id in batch.in_flight or (remaining == 1 and not self._wants_decode(req)):
                continue   # in a batch in flight, or its pending token ends it by length: nothing to compute
            if remaining == 1:
                decodes_left -= 1
                num_new = 1
                k = self.spec.reserve(req, batch.budget - decodes_left - 1, decodes_left)
                if k:
                    batch.speculating.append((len(batch.out.scheduled), k))
                    batch.grant(req, 1, k)
                    continue
            else:
                # A prefill chunk leaves one token of budget for each decode behind it.
                num_new = min(remaining, batch.budget - decodes_left)
                if num_new <= 0:
                    continue
            decodes_left -= self._make_room(req, num_new, batch.out)
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            batch.grant(req, num_new)

    def _make_room(self, req: Request, num_new: int, out: SchedulerOutput) -> int:
        """Allocates req's num_new slots, preempting from the back of running (req itself last) until they fit.
        Returns how many of the preempted others were waiting to decode."""
        decodes = 0
        while not self.kv.allocate_slots(req, num_new):
            victim = self.running[-1]
            if victim is not req and self._wants_decode(victim):
                decodes += 1
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                break
        return decodes

    def _admit_waiting(self, batch: BatchBuilder) -> None:
        """Waiting requests join while seats, tokens and blocks allow, in service order. One whose adapter would
        exceed max_loras, or that is not ready, is stepped over."""
        seats = seats_used(self.running)
        adapters = {r.adapter for r in self.running if r.adapter is not None}
        i = 0
        while i < len(self.waiting) and batch.is_open:
            req = self.waiting[i]
            if req.has_placeholder or req.request_id in batch.in_flight:
                break   # preempted while its last step ran: it can rejoin once that step's token is known
            if not (self._adapter_fits(req, adapters) and self.is_ready(req)):
                i += 1
                continue
            need = seats_needed(req, self.running)
            if seats + need > self.config.max_num_seqs:
                break
            hits, host_keys = self._prefix_blocks(req)
            num_cached = (len(hits) + len(host_keys)) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > batch.budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = batch.budget
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
            batch.grant(req, num_new)
            seats += need

    def mark_in_flight(self, out: SchedulerOutput) -> None:
        """Asynchronous scheduling: out was launched and its sampled ids are not known yet."""
        for s in out.scheduled:
            # A token its group chooses from the step's results is never sampled ahead; a verify row's tokens are
            # resolved before its request is scheduled again (the engine waits).
            if s.samples and not chooses_tokens(s.request) and not s.spec_token_ids:
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
            req.add_prompt_logprobs(*prompt_logprobs[req.request_id])
        if token is None or chooses_tokens(req):
            self.kv.cache_full_blocks(req)
            return [] if token is None else self._group_outputs(req, MemberToken(token, lp))
        position = s.start + s.num_new_tokens
        req.put_token(position, token, lp)   # over the placeholder mark_in_flight put there, if any
        if req.status is RequestStatus.RUNNING:
            self.kv.cache_full_blocks(req)
        reason = self._stop_reason(req, token, position)
        if reason is not None:
            self.drop(req, reason)
        num_outputs = position + 1 - req.num_prompt_tokens
        cached = req.num_cached_tokens if num_outputs == 1 else None
        prompt_lps = None
        if num_outputs == 1 and req.index == 0 and req.params.prompt_logprobs is not None:
            prompt_lps, req.prompt_logprobs = req.prompt_logprobs, []
        if req.group is None:
            return [RequestOutput.of(req, [token], None if lp is None else [lp], reason, cached, prompt_lps)]
        return self._group_outputs(req, MemberToken(token, lp, reason, cached, prompt_lps))

    def _group_outputs(self, req: Request, sampled: MemberToken) -> list[RequestOutput]:
        group = req.group
        outputs = group.on_token(req, sampled, self)
        if group.done:
            del self.groups[group.request_id]
        return outputs

    def _apply_run(self, s: ScheduledRequest, tokens: list[int],
                   lps: list[TokenLogprob] | None) -> list[RequestOutput]:
        """A verify row's results: tokens are its accepted proposals, then the target's own token. A stop (or
        max_tokens) inside the run ends the request there; the tokens after it are dropped."""
        req = s.request
        self.spec.accept(s, len(tokens) - 1)
        reason, emitted = None, 0
        for j, token in enumerate(tokens):
            req.put_token(s.start + 1 + j, token, None if lps is None else lps[j])
            emitted += 1
            reason = self._stop_reason(req, token, s.start + 1 + j)
            if reason is not None:
                break
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
        self.kv.cache_full_blocks(req)
        if reason is not None:
            self.drop(req, reason)
        return [RequestOutput.of(req, tokens[:emitted], None if lps is None else lps[:emitted], reason)]

    # --- internals -------------------------------------------------------------------------------------------------

    def _prefix_blocks(self, req: Request) -> tuple[list[int], list[bytes]]:
        """Blocks a joining request starts with (KVCacheManager.find_prefix): a running sibling's prompt blocks,
        else cached ones. Never for prompt logprobs not yet computed: they need every prompt row."""
        if req.params.prompt_logprobs is not None and req.num_prompt_logprobs < req.num_prompt_tokens - 1:
            return [], []
        return self.kv.find_prefix(req, prompt_donor(req))

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

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=_sort_key)


def _sort_key(req: Request) -> tuple[int, int]:
    return req.sort_key
