"""Continuous batching over a paged KV cache. Plain Python: no torch.

Every request has token_ids and num_computed_tokens; each step gives each scheduled request the tokens it still
lacks K/V for (the whole prompt on its first step, one token per decode step). There is no separate prefill phase,
so chunked prefill later only changes how many tokens a step grants.

Invariants after each schedule():
- every running request holds blocks for num_computed_tokens + its scheduled tokens;
- running is ordered by arrival, so the newest request is the one preempted when blocks run out;
- a preempted request returns to the head of waiting with its blocks freed and num_computed_tokens = 0, keeping
  its generated tokens, which are recomputed with the prompt when it is scheduled again.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import FinishReason, Request, RequestStatus, SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_batched_tokens < self.max_model_len:
            # Without chunked prefill a whole prompt must fit in one step.
            raise ValueError("max_num_batched_tokens must be >= max_model_len")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int          # first position computed this step (== num_computed_tokens before the step)
    samples: bool       # the step reaches the end of the known tokens, so its last logits pick the next token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None


class AdmissionError(ValueError):
    """The request can never run on this engine."""

    def __init__(self, message: str, no_capacity: bool) -> None:
        super().__init__(message)
        self.no_capacity = no_capacity


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # --- admission and abort -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise AdmissionError(f"request id {request_id!r} is already in use", no_capacity=False)
        n = len(prompt_token_ids)
        if n == 0:
            raise AdmissionError("prompt is empty", no_capacity=False)
        if n >= self.config.max_model_len:
            raise AdmissionError(
                f"prompt has {n} tokens; the model's context is {self.config.max_model_len} and leaves no room "
                f"to generate", no_capacity=False)
        if self.kv.blocks_for_tokens(n + 1) > self.kv.num_blocks:
            raise AdmissionError(
                f"prompt needs {self.kv.blocks_for_tokens(n + 1)} KV blocks; the cache has {self.kv.num_blocks}",
                no_capacity=True)
        req = Request(request_id, list(prompt_token_ids), params, arrival=next(self._arrivals))
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._finish(req, FinishReason.ABORTED)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling ------------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # Running requests first, oldest first: they already hold blocks and make progress every step.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget:
                break
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1

        # Then waiting requests join the batch while seats, tokens and blocks allow, in arrival order
        # (preempted requests were put back at the head). No waiting request joins after a preemption this step.
        while self.waiting and not out.preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget or not self.kv.allocate_slots(req, num_new):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self._insert_running(req)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[RequestOutput]:
        """Applies one step's results. sampled_token_ids has one id per scheduled request that samples, in order."""
        samples = iter(sampled_token_ids)
        outputs: list[RequestOutput] = []
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens
            if not s.samples:
                continue
            token = next(samples)
            if req.is_finished:
                continue  # aborted while its step ran
            req.token_ids.append(token)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(RequestOutput(req.request_id, [token], reason))
        return outputs

    # --- internals -------------------------------------------------------------------------------------------------

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP_TOKEN
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _scheduled(req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, num_new, start, samples=start + num_new == req.num_tokens)

    def _insert_running(self, req: Request) -> None:
        # Keep arrival order; a resumed (preempted) request is older than the ones that stayed.
        idx = len(self.running)
        while idx > 0 and self.running[idx - 1].arrival > req.arrival:
            idx -= 1
        self.running.insert(idx, req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
