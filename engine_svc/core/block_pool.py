"""The pool of physical KV blocks: reference counts, an LRU free queue and the prefix-cache index. Plain Python.

Invariants:
- a block is in the free queue exactly when its reference count is 0;
- a block is in the cache index exactly when it holds the complete K/V of the full block its key names; such a
  block stays indexed after its last reference goes, so a later request can revive it, until allocate() takes it
  for new contents (eviction);
- the free queue is in eviction order: allocation takes from the head, freeing appends to the tail, reviving a
  cached block takes it out. So the unreferenced block used longest ago is evicted first.
"""
from __future__ import annotations

from typing import Callable


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[int, bytes], None] | None = None) -> None:
        """on_evict(block, key): called as allocate() takes a cached block, before its contents change (the
        host KV tier saves them)."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))   # insertion-ordered: head = next out
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._num_cached_idle = 0   # free-queue blocks that still hold a key; kept so counts are O(1) per step
        self.num_evictions = 0
        self.on_evict = on_evict

    # --- counts --------------------------------------------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Blocks allocate() can hand out: free ones and unreferenced cached ones."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_idle(self) -> int:
        """Unreferenced blocks that still hold cached contents (reusable until evicted)."""
        return self._num_cached_idle

    @property
    def num_free(self) -> int:
        """Unreferenced blocks without cached contents."""
        return len(self._free) - self.num_cached_idle

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue, in eviction order."""
        return list(self._free)

    # --- allocation ----------------------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} available")
        blocks = []
        for _ in range(n):
            b = next(iter(self._free))
            del self._free[b]
            if self._key_of[b] is not None:
                self._num_cached_idle -= 1
                self._evict(b)
            self._ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, block_ids: list[int]) -> None:
        """Takes one more reference on each block; an unreferenced cached block leaves the free queue (a hit)."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._free[b]
                self._num_cached_idle -= self._key_of[b] is not None
            self._ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            count = self._ref_counts[b]
            if count <= 0:
                raise ValueError(f"block {b} freed while not allocated")
            self._ref_counts[b] = count - 1
            if count == 1:
                self._free[b] = None
                self._num_cached_idle += self._key_of[b] is not None

    # --- prefix cache ---------------------------------------------------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        return self._cached.get(key)

    def cache(self, block_id: int, key: bytes) -> None:
        """Indexes a referenced block whose K/V are now complete. When another block already holds the same key
        (two identical prefixes computed at once), the first stays the cached one and this block stays private."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} cached while not allocated")
        if key in self._cached or self._key_of[block_id] is not None:
            return
        self._cached[key] = block_id
        self._key_of[block_id] = key

    def _evict(self, block_id: int) -> None:
        key = self._key_of[block_id]
        if key is not None:
            del self._cached[key]
            self._key_of[block_id] = None
            self.num_evictions += 1
            if self.on_evict is not None:
                self.on_evict(block_id, key)

    def uncache(self, block_id: int, key: bytes) -> None:
        """Drops block_id from the cache index if it holds key (its contents never arrived: a failed step)."""
        if self._key_of[block_id] == key:
            del self._cached[key]
            self._key_of[block_id] = None
            self._num_cached_idle -= self._ref_counts[block_id] == 0

    def check(self) -> list[str]:
        """Every broken invariant, described; empty when the pool is consistent."""
        problems = []
        for b in range(self.num_blocks):
            ref, free = self._ref_counts[b], b in self._free
            if ref < 0 or (ref == 0) != free:
                problems.append(f"block {b}: ref count {ref} but {'in' if free else 'not in'} the free queue")
            key = self._key_of[b]
            if key is not None and self._cached.get(key) != b:
                problems.append(f"block {b}: has a key the cache index does not map to it")
        for key, b in self._cached.items():
            if self._key_of[b] != key:
                problems.append(f"cache index maps a key to block {b}, which does not hold it")
        idle = sum(1 for b in self._free if self._key_of[b] is not None)
        if idle != self._num_cached_idle:
            problems.append(f"{idle} unreferenced cached blocks, but the counter says {self._num_cached_idle}")
        return problems
