"""A step's results on their way to the host: the sampled ids (and logprobs, prompt logprobs, verify rows' runs) of a
step queued on the device, copied with non_blocking copies into pinned memory and read once those are done."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_svc.core.request import TokenLogprob
from engine_svc.core.scheduler import SchedulerOutput
from engine_svc.sampling.logprobs import token_logprobs
from engine_svc.sampling.sampler import to_device


@dataclass
class StepResult:
    sampled: list[int]                                       # one per sampling row
    logprobs: list[TokenLogprob | None] | None = None        # one per sampling row, when any row asked
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] | None = None
    runs: dict[str, tuple[list[int], list[TokenLogprob] | None]] | None = None   # verify rows' new tokens


class PromptRows:
    """The rows of a step that score prompt tokens for prompt_logprobs: row of position p scores token p + 1."""

    def __init__(self) -> None:
        self.rows_list: list[int] = []
        self.targets: list[int] = []
        self.spans: list[tuple[str, int, int, int]] = []   # (request id, first position scored, count, k)
        self.result: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def of(cls, out: SchedulerOutput) -> "PromptRows | None":
        pr, row = None, 0
        for s in out.scheduled:
            req = s.request
            k = req.params.prompt_logprobs
            end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if k is not None and s.start < end:
                pr = pr or cls()
                pr.rows_list.extend(range(row, row + end - s.start))
                pr.targets.extend(req.token_ids[s.start + 1:end + 1])
                pr.spans.append((req.request_id, s.start + 1, end - s.start, k))
            row += s.num_new_tokens
        return pr

    def score(self, logits: torch.Tensor) -> None:
        targets = to_device(self.targets, torch.int64, logits.device)
        self.result = token_logprobs(logits, targets, max(k for *_, k in self.spans))


class LaunchedStep:
    """A step queued on the device. Its results come to the host in non_blocking copies into pinned memory;
    wait() blocks until those copies are done (never on device work queued after them)."""

    def __init__(self, slots: "PinnedSlots | None") -> None:
        self._slots = slots
        self.sampled: torch.Tensor | None = None
        self.logprobs: tuple[torch.Tensor, ...] | None = None
        self.logprobs_wanted: list[int | None] = []
        self.prompt: PromptRows | None = None
        self.runs: dict | None = None                          # verify rows' tokens, already on the host
        self.host_logprobs: list[TokenLogprob | None] | None = None   # a verify step's logprobs, on the host
        self._host: list[torch.Tensor] = []
        self._event = None

    def send_to_host(self) -> None:
        tensors = [self.sampled, *(self.logprobs or ()), *(self.prompt.result if self.prompt else ())]
        if self._slots is None:   # CPU: already on the host
            self._host = tensors
            return
        self._host = [self._slots.next(self.sampled.numel())] if self.sampled.numel() else [self.sampled.cpu()]
        self._host[0].copy_(self.sampled, non_blocking=True)
        for t in tensors[1:]:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            self._host.append(h)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        host = [t.tolist() for t in self._host]
        result = StepResult(host[0], self.host_logprobs, runs=self.runs)
        rest = host[1:]
        if self.logprobs is not None:
            chosen, top_ids, top_lps = rest[:3]
            rest = rest[3:]
            result.logprobs = [
                None if k is None else TokenLogprob(tok, chosen[i], tuple(zip(top_ids[i][:k], top_lps[i][:k])))
                for i, (tok, k) in enumerate(zip(result.sampled, self.logprobs_wanted))]
        if self.prompt is not None:
            chosen, top_ids, top_lps = rest[:3]
            result.prompt_logprobs, i = {}, 0
            for rid, first, count, k in self.prompt.spans:
                result.prompt_logprobs[rid] = (first, [
                    TokenLogprob(self.prompt.targets[j], chosen[j], tuple(zip(top_ids[j][:k], top_lps[j][:k])))
                    for j in range(i, i + count)])
                i += count
        return result


class PinnedSlots:
    """Two pinned host buffers for sampled ids, taken in turn: at most one step is in flight while the next is
    launched, so a buffer is never reused before its step has been waited on."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._bufs = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._turn = 0

    def next(self, n: int) -> torch.Tensor:
        if n > self._size:
            self.__init__(n)
        self._turn ^= 1
        return self._bufs[self._turn][:n]
