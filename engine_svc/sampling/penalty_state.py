"""Penalty counts kept on the device, so that penalties need no output ids on the host and asynchronous scheduling
stays on for them.

Each live request that uses penalties holds a slot: a bool row over the vocabulary (its prompt's tokens) and an
int32 row (how often it has output each token). A slot is filled from the request's ids on the host when the request
first samples; after that each step adds the ids it sampled, on the device, with no host round trip. The host keeps
only how many outputs a slot has counted.

Invariant: a slot whose count equals its request's output count (an in-flight placeholder included) holds exactly
that request's outputs, because a plain sampling row puts its sampled id at a new output position (the scheduler's
_apply). Tokens that come another way are not counted here: a beam's (its group picks them) and a verify row's run
(speculative decoding; count() is not called for such a step). Their slot falls behind and is refilled from the host
ids, which must be real by then: needs_real_ids tells the engine when to wait for them.

Device work runs in the order it was queued, so a slot freed and handed to another request is refilled after every
update still queued for its previous owner.

The pool grows by doubling up to `capacity` slots (the engine's max_num_seqs: a step samples at most that many
rows), so it costs nothing until a request uses penalties, and at most pool_peak_bytes, which the memory plan
reserves. Preempted requests keep their slots while they wait; when the pool is full, a slot of a request outside
the current batch is taken back (its owner refills from the host when it samples again).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_svc.core.beam_search import BeamSearch
from engine_svc.core.request import PLACEHOLDER, Request
from engine_svc.sampling.logits_processors import Penalties, token_counts
from engine_svc.sampling.sampler import padded, penalty_values, to_device

MIN_SLOTS = 8


@dataclass(eq=False)
class _Slot:
    request: Request
    index: int
    counted: int = 0   # the request's outputs the slot holds


def _pool_sizes(capacity: int) -> list[int]:
    """The slot counts the pool takes as it grows, in order."""
    sizes = [min(MIN_SLOTS, capacity)]
    while sizes[-1] < capacity:
        sizes.append(min(2 * sizes[-1], capacity))
    return sizes


def pool_peak_bytes(capacity: int, vocab_size: int) -> int:
    """The most device memory the pool ever holds: during its last growth, the old pool and the new one."""
    sizes = [0, *_pool_sizes(capacity)]
    return max(a + b for a, b in zip(sizes, sizes[1:])) * vocab_size * (1 + 4)   # bool + int32 per token


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a penalty pool needs at least one slot, got {capacity}")
        self.vocab_size, self.device, self.capacity = vocab_size, device, capacity
        self._slots: dict[str, _Slot] = {}
        self._free: list[int] = []
        self.prompt_seen: torch.Tensor | None = None   # [capacity, V] bool; allocated with the first slot
        self.counts: torch.Tensor | None = None        # [capacity, V] int32
        self._to_count: list[tuple[int, _Slot]] = []   # (batch row, slot) of the last penalties() call

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def is_current(self, req: Request) -> bool:
        slot = self._slots.get(req.request_id)
        return slot is not None and slot.request is req and slot.counted == req.num_output_tokens

    def needs_real_ids(self, req: Request) -> bool:
        """req's next sampling step cannot be penalized from the device: its slot is behind and the id it lacks is
        still in flight."""
        return req.has_placeholder and not self.is_current(req)

    @torch.inference_mode()   # the pool is updated in place: it is made, and only ever changed, in inference mode
    def penalties(self, requests: list[Request]) -> Penalties | None:
        """The penalties of a batch's sampling rows (one request each), None when no row uses them. The rows whose
        sampled id becomes their next output are counted by count() once sampled."""
        rows = [i for i, r in enumerate(requests) if r.params.uses_penalties]
        self._to_count = []
        if not rows:
            return None
        self._release_finished()
        batch = {requests[i].request_id for i in rows}
        slots = [self._slot_for(requests[i], batch) for i in rows]
        self._refill([s for s in slots if s.counted != s.request.num_output_tokens])
        self._to_count = [(i, s) for i, s in zip(rows, slots) if not isinstance(s.request.group, BeamSearch)]
        index = to_device([s.index for s in slots], torch.int64, self.device)
        repetition, presence, frequency = penalty_values([requests[i].params for i in rows], self.device)
        return Penalties(to_device(rows, torch.int64, self.device), self.prompt_seen[index], self.counts[index],
                         repetition, presence, frequency)

    @torch.inference_mode()
    def count(self, sampled: torch.Tensor) -> None:
        """Adds the sampled ids ([N] int64 on the device, one per batch row) of the rows penalties() named."""
        if not self._to_count:
            return
        rows, slots = zip(*self._to_count)
        index = to_device([s.index for s in slots], torch.int64, self.device)
        ids = sampled[to_device(list(rows), torch.int64, self.device)]
        self.counts.index_put_((index, ids), torch.ones((), dtype=torch.int32, device=self.device), accumulate=True)
        for s in slots:
            s.counted += 1
        self._to_count = []

    def _slot_for(self, req: Request, batch: set[str]) -> _Slot:
        slot = self._slots.get(req.request_id)
        if slot is not None and slot.request is req:
            return slot
        if slot is not None:   # an ended request's id, taken again
            self._free.append(slot.index)
        if not self._free and self._size() < self.capacity:
            self._grow()
        if not self._free:     # full: a waiting request's slot (the batch has at most `capacity` rows)
            rid = next(rid for rid in self._slots if rid not in batch)
            self._free.append(self._slots.pop(rid).index)
        slot = self._slots[req.request_id] = _Slot(req, self._free.pop(), counted=-1)   # -1: refill it
        return slot

    def _refill(self, slots: list[_Slot]) -> None:
        if not slots:
            return
        outputs = [s.request.output_token_ids for s in slots]
        if any(PLACEHOLDER in o for o in outputs):
            raise RuntimeError("penalty counts behind an output id still in flight (the engine must wait for it)")
        index = to_device([s.index for s in slots], torch.int64, self.device)
        prompts = padded([s.request.prompt_token_ids for s in slots], self.device)
        self.prompt_seen[index] = token_counts(prompts, self.vocab_size) > 0
        self.counts[index] = token_counts(padded(outputs, self.device), self.vocab_size)
        for s, o in zip(slots, outputs):
            s.counted = len(o)

    def _release_finished(self) -> None:
        for rid in [rid for rid, s in self._slots.items() if s.request.is_finished]:
            self._free.append(self._slots.pop(rid).index)

    def _size(self) -> int:
        return 0 if self.counts is None else self.counts.shape[0]

    def _grow(self) -> None:
        old = self._size()
        new = next(n for n in _pool_sizes(self.capacity) if n > old)
        seen = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        if old:
            seen[:old], counts[:old] = self.prompt_seen, self.counts
        self.prompt_seen, self.counts = seen, counts
        self._free.extend(range(new - 1, old - 1, -1))
