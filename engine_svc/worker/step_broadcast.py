"""The per-step broadcast: the driver packs a StepPlan into one int64 tensor and broadcasts it to every other rank
over a gloo group (CPU tensors, whatever the device), once per step.

Under pipeline parallelism the driver broadcasts on one group per stage and does not wait for the broadcasts to
complete: a stage still busy with an earlier batch takes the plan when it gets to it, while the other stages start
at once (a broadcast that waited for every receiver would serialise the stages). Each plan then has its own send
tensor, kept until its broadcasts are done.

Layout: a header (command, table width, graph batch and width, real rows, logits rows, flags, then each field's
length), then the fields back to back. The broadcast tensor has a fixed capacity (the receivers must know its size before it arrives); a
step larger than it (long prefills, wide block tables) sends the remainder in a second broadcast. A decode step of
a few dozen sequences fits in the first.

Between steps the driver may also send a RankCall (a change every rank applies before the next step, e.g. a LoRA
adapter loaded or written into a slot): the header's command says so, and the call follows as one pickled object.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from engine_svc.worker.graph_layout import GraphShape
from engine_svc.worker.input_buffers import HostStep
from engine_svc.worker.step_plan import StepPlan

STEP, STOP, CALL = 1, 0, 2
_HOST_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start", "logits_rows",
                "block_tables", "placeholder_dst", "placeholder_src")
_FLAG_LORA = 1
_FIXED = 7   # command, table width, graph batch, graph width, real rows, logits rows, flags
IDLE_TIMEOUT = timedelta(days=365)   # a worker waits here while the engine is idle: never a timeout


@dataclass(frozen=True)
class RankCall:
    """A change the driver made that every other rank repeats: `op` with `args` on the rank's `target` (the runner
    attribute that applies it, e.g. "lora")."""
    target: str
    op: str
    args: tuple


class StepChannel:
    def __init__(self, groups: list, rank: int, extra_fields: tuple[str, ...] = (), capacity: int = 2048,
                 asynchronous: bool = False) -> None:
        """groups: the gloo process groups the plan goes over, each with the driver (global rank 0) in it: the
        driver sends on all of them, a worker receives on its one; extra_fields: HostStep.extra's names (the LoRA
        plan), in a fixed order; asynchronous: the driver's sends return before the receivers have the plan."""
        self.groups = groups
        self.rank = rank
        self.asynchronous = asynchronous
        self._pending: list = []   # (work, tensor) of asynchronous sends not yet complete
        self.extra_fields = extra_fields
        self._names = _HOST_FIELDS + ("prompt_rows",) + extra_fields
        self._header = _FIXED + len(self._names)
        self.capacity = max(capacity, self._header)
        self._buf = torch.zeros(self.capacity, dtype=torch.int64)
        self._arr = self._buf.numpy()

    # --- driver ----------------------------------------------------------------------------------------------------

    def send(self, plan: StepPlan) -> None:
        h = plan.host
        parts = [getattr(h, n) for n in _HOST_FIELDS] + [plan.prompt_rows] + [h.extra[n] for n in self.extra_fields]
        flags = _FLAG_LORA if plan.lora_active else 0
        graph = plan.graph or GraphShape(0, 0)
        header = [STEP, h.table_width, graph.batch, graph.width, plan.num_real, plan.num_logits, flags,
                  *map(len, parts)]
        total = self._header + sum(map(len, parts))
        if self.asynchronous:   # the previous plan's tensor may still be on its way
            self._buf = torch.empty(max(self.capacity, total), dtype=torch.int64)
            self._arr = self._buf.numpy()
        flat = self._arr if total <= len(self._arr) else np.empty(total, dtype=np.int64)
        flat[:self._header] = header
        i = self._header
        for p in parts:
            flat[i:i + len(p)] = p
            i += len(p)
        if flat is not self._arr:
            self._arr[:] = flat[:self.capacity]
        self._broadcast(self._buf[:self.capacity])
        if total > self.capacity:
            self._broadcast(self._buf[self.capacity:total] if self.asynchronous else
                            torch.from_numpy(flat[self.capacity:]))

    def send_stop(self, timeout_s: float = 10.0) -> None:
        """Tells every worker to leave its loop; waits (at most timeout_s) for the asynchronous sends to finish."""
        if self.asynchronous:
            self._buf = torch.zeros(self.capacity, dtype=torch.int64)
            self._arr = self._buf.numpy()
        self._arr[0] = STOP
        self._broadcast(self._buf)
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
            time.sleep(0.01)

    def send_call(self, call: RankCall) -> None:
        import torch.distributed as dist
        if self.asynchronous:   # the previous plan's tensor may still be on its way
            self._buf = torch.zeros(self.capacity, dtype=torch.int64)
            self._arr = self._buf.numpy()
        self._arr[0] = CALL
        self._broadcast(self._buf)
        for group in self.groups:
            dist.broadcast_object_list([call], src=0, group=group)

    # --- workers ---------------------------------------------------------------------------------------------------

    def recv(self) -> StepPlan | RankCall | None:
        """The next step's plan, a RankCall, or None when the driver stops."""
        self._broadcast(self._buf)
        head = self._arr[:self._header].tolist()
        if head[0] == STOP:
            return None
        if head[0] == CALL:
            import torch.distributed as dist
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.groups[0])   # a worker's one group
            return box[0]
        _, width, batch, graph_width, num_real, num_logits, flags, *lengths = head
        total = self._header + sum(lengths)
        flat = self._arr
        if total > self.capacity:
            rest = torch.empty(total - self.capacity, dtype=torch.int64)
            self._broadcast(rest)
            flat = np.concatenate([self._arr, rest.numpy()])
        fields, i = {}, self._header
        for name, n in zip(self._names, lengths):
            fields[name] = flat[i:i + n].tolist()
            i += n
        host = HostStep(*(fields[n] for n in _HOST_FIELDS[:7]), width, fields["placeholder_dst"],
                        fields["placeholder_src"], {n: fields[n] for n in self.extra_fields})
        graph = GraphShape(batch, graph_width) if batch else None
        return StepPlan(host, graph, num_real, num_logits, tuple(fields["prompt_rows"]), bool(flags & _FLAG_LORA))

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist
        if not self.asynchronous:
            for group in self.groups:
                dist.broadcast(t, src=0, group=group)
            return
        self._pending = [(w, x) for w, x in self._pending if not w.is_completed()]
        self._pending += [(dist.broadcast(t, src=0, group=group, async_op=True), t) for group in self.groups]
