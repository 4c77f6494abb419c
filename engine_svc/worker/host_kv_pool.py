"""The memory of the host KV tier (`--kv-offload-gb`) and the copies between it and the device KV cache.

The host pool has one tensor per layer shaped like the layer's device cache, with host slots in place of blocks,
so a block moves as one slice per layer and K/V half. The core (engine_svc.core.host_kv_tier) decides which
block goes to which slot; run() carries out one step's KVCopies before the step's forward: every offload, then
every load (a device block evicted and reloaded in the same step is read out before it is overwritten).

On CUDA the host tensors are pinned and every copy is non_blocking on the compute stream: they run in stream
order after the previous step's forward (which wrote the blocks being offloaded) and before this step's (which
reads the blocks being loaded), without the host waiting. The core pins a slot while a step that reads it is in
flight, so a later offload never overwrites it early. Runs of consecutive slots and blocks move as one copy.
"""
from __future__ import annotations

import torch

from engine_svc.attention import KVCache
from engine_svc.core.host_kv_tier import KVCopies


class HostKVPool:
    def __init__(self, device_caches: list[KVCache], num_slots: int, pin: bool) -> None:
        self.device_caches = device_caches
        self.num_slots = num_slots
        self.host = [torch.zeros((2, num_slots, *c.data.shape[2:]), dtype=c.data.dtype, pin_memory=pin)
                     for c in device_caches]

    @staticmethod
    def bytes_per_block(device_caches: list[KVCache]) -> int:
        """K and V of one block over every layer: what one offload or load moves."""
        return sum(c.data[:, 0].numel() * c.data.element_size() for c in device_caches)

    @classmethod
    def slots_for(cls, gb: float, device_caches: list[KVCache]) -> int:
        n = int(gb * (1 << 30)) // cls.bytes_per_block(device_caches)
        if n < 1:
            raise ValueError(f"kv_offload_gb {gb} holds no KV block ({cls.bytes_per_block(device_caches)} bytes "
                             f"each)")
        return n

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.bytes_per_block(self.device_caches)

    @torch.inference_mode()
    def run(self, copies: KVCopies) -> None:
        offloads = _runs(copies.offloads)
        loads = _runs(copies.loads)
        for cache, host in zip(self.device_caches, self.host):
            for block, slot, n in offloads:
                for kv in (0, 1):
                    host[kv, slot:slot + n].copy_(cache.data[kv, block:block + n], non_blocking=True)
        for cache, host in zip(self.device_caches, self.host):
            for slot, block, n in loads:
                for kv in (0, 1):
                    cache.data[kv, block:block + n].copy_(host[kv, slot:slot + n], non_blocking=True)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) pairs as (src start, dst start, length) runs where both sides are consecutive. A destination
    appears at most once in one step's list (the core keeps the last offload to a slot; load targets are fresh
    blocks), so the copies' order within a list does not matter."""
    runs: list[list[int]] = []
    for src, dst in sorted(pairs, key=lambda p: p[1]):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(r) for r in runs]
