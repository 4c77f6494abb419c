"""Persistent step-input buffers: host staging (pinned on CUDA) and the device tensors the model reads.

Allocated once at the largest step shape, so a step costs no allocation, and the device tensors keep fixed addresses
for CUDA graphs to read. Host staging is double-buffered: the host fills one set while the other may still be
copying (non_blocking) to the device; a set is reused only after the event recorded behind its copies has passed.
The device set is single: every copy into it is queued on the compute stream after the kernels of the previous
step, so it is never overwritten while still being read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# name -> (dtype, size key): "tokens" rows per token of a step, "seqs" per sequence, "seqs+1", or "tables".
_FIELDS = {
    "input_ids": (torch.int64, "tokens"),
    "positions": (torch.int64, "tokens"),
    "slot_mapping": (torch.int64, "tokens"),
    "seq_lens": (torch.int32, "seqs"),
    "query_start": (torch.int32, "seqs+1"),
    "logits_rows": (torch.int64, "tokens"),   # a verify row (speculative decoding) has one per token
    "block_tables": (torch.int32, "tables"),
    # Asynchronous scheduling: input_ids[placeholder_dst[i]] = previous sampled ids[placeholder_src[i]].
    "placeholder_dst": (torch.int64, "seqs"),
    "placeholder_src": (torch.int64, "seqs"),
}


@dataclass
class HostStep:
    """One step's inputs as host lists; block_tables is row-major [num_seqs, table_width]."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]
    query_start: list[int]
    logits_rows: list[int]
    block_tables: list[int]
    table_width: int
    placeholder_dst: list[int]
    placeholder_src: list[int]
    extra: dict[str, list[int]] = field(default_factory=dict)   # the InputBuffers' extra_fields, by name


class InputBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device,
                 extra_fields: tuple[str, ...] = ()) -> None:
        """extra_fields: further int32 per-token tensors (e.g. LoRA's token plan), filled from HostStep.extra."""
        sizes = {"tokens": max_tokens, "seqs": max_seqs, "seqs+1": max_seqs + 1,
                 "tables": max_seqs * max_blocks_per_seq}
        self._fields = dict(_FIELDS, **{name: (torch.int32, "tokens") for name in extra_fields})
        self.device = device
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self._on_cuda = device.type == "cuda"
        self.device_tensors = {name: torch.zeros(sizes[key], dtype=dtype, device=device)
                               for name, (dtype, key) in self._fields.items()}
        if self._on_cuda:
            self._host_sets = [{name: torch.zeros(sizes[key], dtype=dtype, pin_memory=True)
                                for name, (dtype, key) in self._fields.items()} for _ in range(2)]
            self._copied = [None, None]
        else:  # the device is the host: fill the model's tensors directly
            self._host_sets = [self.device_tensors]
            self._copied = [None]
        self._arrays = [{name: t.numpy() for name, t in hs.items()} for hs in self._host_sets]
        self._turn = 0

    def load(self, step: HostStep) -> dict[str, torch.Tensor]:
        """Copies the step into the device tensors; returns views of them sized to the step."""
        i = self._turn
        self._turn = (self._turn + 1) % len(self._host_sets)
        if self._copied[i] is not None:
            self._copied[i].synchronize()   # its previous copies have left the staging memory
        arrays, host = self._arrays[i], self._host_sets[i]
        views = {}
        for name in self._fields:
            data = getattr(step, name) if name in _FIELDS else step.extra[name]
            n = len(data)
            if n:
                arrays[name][:n] = data
            views[name] = self._to_device(host[name], self.device_tensors[name], n)
        if self._on_cuda:
            event = torch.cuda.Event()
            event.record()
            self._copied[i] = event
        views["block_tables"] = views["block_tables"].view(len(step.seq_lens), step.table_width)
        return views

    def _to_device(self, host: torch.Tensor, dev: torch.Tensor, n: int) -> torch.Tensor:
        if self._on_cuda and n:
            dev[:n].copy_(host[:n], non_blocking=True)
        return dev[:n]


def table_rows(tables: list[list[int]], width: int) -> list[int]:
    """Row-major flattening, each row padded with block 0 (never read: rows past a sequence's length are masked)."""
    flat: list[int] = []
    for row in tables:
        flat.extend(row)
        flat.extend([0] * (width - len(row)))
    return flat


__all__ = ["HostStep", "InputBuffers", "table_rows"]
