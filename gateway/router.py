"""Which engine replica serves a request: pure policy, no gRPC, no clock.

Prefix-aware (the default): the prompt's full token blocks are hashed in a chain, like the engine's prefix cache
(each key covers every earlier token; the cache salt and the adapter enter the first key, so requests that could
never share KV never match). A bounded LRU remembers which replica last served each block key. A request goes to
the live replica that holds its longest matching prefix, unless that replica's load exceeds the least-loaded live
replica's by more than `load_margin`; otherwise (no match, or too busy) to the least-loaded live replica.

Load of a replica = the gateway's own in-flight requests on it (exact, now) + the engine's other requests (running
and waiting in its last GetLoad, less this gateway's in-flight requests at that moment: those of other gateways)
+ its KV usage fraction (0..1, a tie-breaker between equally busy replicas). Counting this gateway's requests only
once keeps a poll that is up to one interval old from making a replica that just finished its work look busy.
Ties go round-robin, so unrelated concurrent requests spread over idle replicas.
"""
from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass

POLICIES = ("prefix", "least_loaded", "round_robin")


@dataclass
class ReplicaLoad:
    """What the router knows of one replica; the pipeline keeps it current."""
    name: str
    live: bool = True
    in_flight: int = 0        # the gateway's own requests on it, exact
    others: int = 0           # the engine's running + waiting beyond this gateway's requests, at its last GetLoad
    kv_usage: float = 0.0     # used / total KV blocks, at its last GetLoad

    @property
    def score(self) -> float:
        return self.in_flight + self.others + self.kv_usage


def prefix_block_keys(token_ids: list[int], block_size: int, cache_salt: str = "", adapter: str = "") -> list[bytes]:
    """Chained keys of the full blocks of token_ids; the salt and the adapter are length-prefixed into the first."""
    keys: list[bytes] = []
    parent = b"\x00".join((len(cache_salt).to_bytes(4, "little") + cache_salt.encode(),
                           len(adapter).to_bytes(4, "little") + adapter.encode()))
    for i in range(len(token_ids) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixIndex:
    """Bounded LRU: block key -> the replica that last served a prompt containing that block."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._owner: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, key: bytes) -> str | None:
        return self._owner.get(key)

    def longest_match(self, keys: list[bytes], live: set[str]) -> tuple[str | None, int]:
        """(replica, matched blocks) for the longest prefix of keys held by a live replica. Keys chain, so the owner
        of block i also served blocks 0..i-1 (unless evicted there since: the engine decides what it still has)."""
        owners = []
        for key in keys:
            owner = self._owner.get(key)
            if owner is None:
                break
            owners.append(owner)
        for n in range(len(owners), 0, -1):
            if owners[n - 1] in live:
                return owners[n - 1], n
        return None, 0

    def record(self, keys: list[bytes], replica: str) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica that went down may come back with an empty cache: its blocks are no longer a reason to go there."""
        for key in [k for k, owner in self._owner.items() if owner == replica]:
            del self._owner[key]


class Router:
    def __init__(self, policy: str = "prefix", load_margin: float = 4.0, index_capacity: int = 65536) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if load_margin < 0:
            raise ValueError(f"load margin must be >= 0, got {load_margin}")
        self.policy = policy
        self.load_margin = load_margin
        self.index = PrefixIndex(index_capacity)
        self._next = 0   # round-robin cursor: the policy's order, and the tie-break of the others

    def choose(self, replicas: list[ReplicaLoad], keys: list[bytes]) -> str | None:
        """The replica for a request with these prefix keys; None when no replica is live. Records the choice."""
        live = [r for r in replicas if r.live]
        if not live:
            return None
        start = self._next % len(live)
        self._next += 1
        rotated = live[start:] + live[:start]
        if self.policy == "round_robin":
            chosen = rotated[0].name
        else:
            least = min(rotated, key=lambda r: r.score)
            chosen = least.name
            if self.policy == "prefix":
                holder, _ = self.index.longest_match(keys, {r.name for r in live})
                if holder is not None:
                    load = next(r for r in live if r.name == holder)
                    if load.score <= least.score + self.load_margin:
                        chosen = holder
        self.index.record(keys, chosen)
        return chosen

    def forget(self, replica: str) -> None:
        self.index.forget(replica)
