"""The pool of physical KV blocks: a free list and reference counts. Plain Python: no torch.

Invariant: a block is in the free list exactly when its reference count is 0. Freed blocks go to the tail and
allocation takes from the head, so recently freed blocks are reused last (the prefix cache will rely on this).
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} freed while not allocated")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free.append(b)
