"""The host tier of the KV cache (`--kv-offload-gb`): which block keys have their K/V in which host slot. Plain
Python: the model runner owns the slots' memory and runs the copies each step's KVCopies lists.

A block the device pool evicts goes to a host slot under the same key (chained block hash: salt and adapter are in
it, so the prefix cache's sharing rules hold here unchanged); a later prefix lookup that misses the device pool
continues here, and each block found is copied back into a fresh device block instead of being recomputed.

Invariants:
- a key is in the index exactly when its slot holds (or, by the end of the copies planned so far, will hold) the
  complete K/V of the block it names; a slot is free exactly when no key maps to it;
- the index is in LRU order: storing or loading a key moves it to the tail, and storing into a full tier evicts
  the unpinned key used longest ago;
- a slot is pinned while a step that reads it (a load) has not had its results applied: a pinned slot is never
  evicted, so no offload can overwrite K/V that a step in flight still reads. When every slot is pinned or taken,
  an offload is dropped (its block is simply lost, as without the tier).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVCopies:
    """One step's copies between the tiers, run before its forward: every offload before every load, so a device
    block evicted and reloaded in the same step is read out before it is overwritten."""
    offloads: list[tuple[int, int]] = field(default_factory=list)   # (device block, host slot)
    loads: list[tuple[int, int]] = field(default_factory=list)      # (host slot, device block)

    def __bool__(self) -> bool:
        return bool(self.offloads or self.loads)


@dataclass
class HostTierStats:
    offloaded_blocks: int = 0   # device -> host copies planned
    loaded_blocks: int = 0      # host -> device copies planned: the tier's hits, in blocks
    dropped_offloads: int = 0   # evicted device blocks the tier had no unpinned slot for
    evictions: int = 0          # host entries overwritten to make room


class HostTier:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"a host KV tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: dict[bytes, int] = {}           # insertion-ordered: head = least recently used
        self._key_in: list[bytes | None] = [None] * num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))   # a stack: slot 0 is handed out first
        self._pins = [0] * num_slots
        self.stats = HostTierStats()

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def lru_keys(self) -> list[bytes]:
        """The index in eviction order (least recently used first)."""
        return list(self._slot_of)

    def slot(self, key: bytes) -> int | None:
        return self._slot_of.get(key)

    def is_pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self._pins if n)

    def key_in(self, slot: int) -> bytes | None:
        return self._key_in[slot]

    def store(self, key: bytes) -> int | None:
        """Makes room for key's K/V: the slot the caller must copy them to, or None when no copy is needed (the
        key is here already, so only its recency changes) or possible (every slot pinned: the offload drops)."""
        if key in self._slot_of:
            self._touch(key)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k, s in self._slot_of.items() if not self._pins[s]), None)
            if victim is None:
                self.stats.dropped_offloads += 1
                return None
            slot = self._slot_of.pop(victim)
            self.stats.evictions += 1
        self._slot_of[key] = slot
        self._key_in[slot] = key
        self.stats.offloaded_blocks += 1
        return slot

    def take_for_load(self, key: bytes) -> int:
        """key's slot, pinned until release(); a load of it is planned."""
        slot = self._slot_of[key]
        self._pins[slot] += 1
        self._touch(key)
        self.stats.loaded_blocks += 1
        return slot

    def release(self, slots: list[int]) -> None:
        """The loads from slots have run and their step's results are applied."""
        for s in slots:
            if self._pins[s] <= 0:
                raise ValueError(f"host slot {s} released while not pinned")
            self._pins[s] -= 1

    def release_all(self) -> None:
        """No step is in flight any more (the engine dropped them after a failure)."""
        self._pins = [0] * self.num_slots

    def discard(self, slot: int) -> None:
        """Forgets the slot's key (its copy never ran: a failed step); the slot is free again."""
        key = self._key_in[slot]
        if key is not None:
            del self._slot_of[key]
            self._key_in[slot] = None
            self._free.append(slot)

    def _touch(self, key: bytes) -> None:
        self._slot_of[key] = self._slot_of.pop(key)

    def check(self) -> list[str]:
        """Every broken invariant, described; empty when the tier is consistent."""
        problems = []
        for key, s in self._slot_of.items():
            if self._key_in[s] != key:
                problems.append(f"host index maps a key to slot {s}, which does not hold it")
        held = {s for s in range(self.num_slots) if self._key_in[s] is not None}
        if held != set(self._slot_of.values()):
            problems.append("host slots hold keys the index does not map to them")
        if set(self._free) & held or len(set(self._free)) != len(self._free):
            problems.append("a host slot is both free and holding a key, or free twice")
        if len(self._free) + len(held) != self.num_slots:
            problems.append(f"{len(self._free)} free + {len(held)} used host slots != {self.num_slots}")
        problems += [f"host slot {s} pinned {n} times" for s, n in enumerate(self._pins) if n < 0]
        return problems
