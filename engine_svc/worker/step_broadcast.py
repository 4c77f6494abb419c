"""The per-step broadcast: the driver packs a StepPlan into one int64 tensor and broadcasts it to every other rank
over a gloo group (CPU tensors, whatever the device), once per step.

Layout: a header (command, table width, graph bucket, real rows, flags, then each field's length), then the fields
back to back. The broadcast tensor has a fixed capacity (the receivers must know its size before it arrives); a
step larger than it (long prefills, wide block tables) sends the remainder in a second broadcast. A decode step of
a few dozen sequences fits in the first.

Between steps the driver may also send a RankCall (a change every rank applies before the next step, e.g. a LoRA
adapter loaded or written into a slot): the header's command says so, and the call follows as one pickled object.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from engine_svc.worker.input_buffers import HostStep
from engine_svc.worker.step_plan import StepPlan

STEP, STOP, CALL = 1, 0, 2
_HOST_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start", "logits_rows",
                "block_tables", "placeholder_dst", "placeholder_src")
_FLAG_LORA = 1
_FIXED = 5   # command, table width, graph bucket, real rows, flags
IDLE_TIMEOUT = timedelta(days=365)   # a worker waits here while the engine is idle: never a timeout


@dataclass(frozen=True)
class RankCall:
    """A change the driver made that every other rank repeats: `op` with `args` on the rank's `target` (the runner
    attribute that applies it, e.g. "lora")."""
    target: str
    op: str
    args: tuple


class StepChannel:
    def __init__(self, group, rank: int, extra_fields: tuple[str, ...] = (), capacity: int = 2048) -> None:
        """group: a gloo process group of every rank, driver (rank 0) included; extra_fields: HostStep.extra's
        names (the LoRA plan), in a fixed order."""
        self.group = group
        self.rank = rank
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
        header = [STEP, h.table_width, plan.graph_bucket, plan.num_real, flags, *map(len, parts)]
        total = self._header + sum(map(len, parts))
        flat = self._arr if total <= self.capacity else np.empty(total, dtype=np.int64)
        flat[:self._header] = header
        i = self._header
        for p in parts:
            flat[i:i + len(p)] = p
            i += len(p)
        if flat is not self._arr:
            self._arr[:] = flat[:self.capacity]
        self._broadcast(self._buf)
        if total > self.capacity:
            self._broadcast(torch.from_numpy(flat[self.capacity:]))

    def send_stop(self) -> None:
        self._arr[0] = STOP
        self._broadcast(self._buf)

    def send_call(self, call: RankCall) -> None:
        import torch.distributed as dist
        self._arr[0] = CALL
        self._broadcast(self._buf)
        dist.broadcast_object_list([call], src=0, group=self.group)

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
            dist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]
        _, width, bucket, num_real, flags, *lengths = head
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
        return StepPlan(host, bucket, num_real, tuple(fields["prompt_rows"]), bool(flags & _FLAG_LORA))

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist
        dist.broadcast(t, src=0, group=self.group)
