"""The routing policy on exact state: fake replica loads, no processes."""
from __future__ import annotations

import hashlib
from array import array

import pytest

from gateway.router import POLICIES, PrefixIndex, ReplicaLoad, Router, prefix_block_keys

BS = 16


def reference_keys(tokens: list[int], salt: str = "", adapter: str = "") -> list[bytes]:
    """Independent chain: key i = H(key i-1, block i), the root made of the salt and adapter."""
    root = (len(salt).to_bytes(4, "little") + salt.encode() + b"\x00"
            + len(adapter).to_bytes(4, "little") + adapter.encode())
    out, parent = [], root
    for start in range(0, len(tokens) - BS + 1, BS):
        parent = hashlib.blake2b(parent + array("q", tokens[start:start + BS]).tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


def test_keys_cover_full_blocks_and_chain():
    tokens = list(range(50))
    keys = prefix_block_keys(tokens, BS)
    assert keys == reference_keys(tokens)
    assert len(keys) == 3                                   # 50 tokens: three full blocks, the tail is not keyed
    other = prefix_block_keys([999] + tokens[1:], BS)       # first block differs: every later key differs too
    assert all(a != b for a, b in zip(keys, other))
    assert prefix_block_keys(tokens[:32] + [7] * 18, BS)[:2] == keys[:2]


def test_salt_and_adapter_separate_keys():
    tokens = list(range(32))
    plain = prefix_block_keys(tokens, BS)
    salted = prefix_block_keys(tokens, BS, cache_salt="a")
    adapted = prefix_block_keys(tokens, BS, adapter="a")
    assert salted == reference_keys(tokens, salt="a") and adapted == reference_keys(tokens, adapter="a")
    assert len({plain[0], salted[0], adapted[0]}) == 3
    assert len({plain[1], salted[1], adapted[1]}) == 3


def test_index_is_a_bounded_lru():
    index = PrefixIndex(capacity=3)
    index.record([b"a", b"b"], "r1")
    index.record([b"c"], "r2")
    index.record([b"a"], "r2")           # touched: b is now the oldest
    index.record([b"d"], "r1")
    assert len(index) == 3 and index.owner(b"b") is None
    assert (index.owner(b"a"), index.owner(b"c"), index.owner(b"d")) == ("r2", "r2", "r1")
    index.forget("r2")
    assert len(index) == 1 and index.owner(b"d") == "r1"
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_longest_match_stops_at_the_first_unknown_block_and_skips_down_replicas():
    index = PrefixIndex(100)
    index.record([b"k0", b"k1"], "r1")
    index.record([b"k0", b"k1", b"k2"], "r2")
    index.record([b"k4"], "r3")
    assert index.longest_match([b"k0", b"k1", b"k2", b"k3", b"k4"], {"r1", "r2", "r3"}) == ("r2", 3)
    # r2 down: the longest prefix on a live replica; the owner of k1 is now r2 too, so only k0... none live
    assert index.longest_match([b"k0", b"k1", b"k2"], {"r1", "r3"}) == (None, 0)
    index.record([b"k0"], "r1")
    assert index.longest_match([b"k0", b"k1", b"k2"], {"r1", "r3"}) == ("r1", 1)
    assert index.longest_match([b"zz", b"k0"], {"r1", "r2"}) == (None, 0)


def loads(*scores: int, live=None) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", live=True if live is None else live[i], in_flight=s) for i, s in enumerate(scores)]


def test_least_loaded_uses_in_flight_other_load_and_kv_usage():
    router = Router("least_loaded")
    assert router.choose(loads(3, 1, 2), []) == "r1"
    busy_engine = [ReplicaLoad("r0", in_flight=1, others=4), ReplicaLoad("r1", in_flight=4)]
    assert router.choose(busy_engine, []) == "r1"               # 4 < 1 + 4
    kv = [ReplicaLoad("r0", in_flight=1, kv_usage=0.9), ReplicaLoad("r1", in_flight=1, kv_usage=0.2)]
    assert router.choose(kv, []) == "r1"


def test_ties_rotate_and_down_replicas_are_skipped():
    router = Router("least_loaded")
    assert [router.choose(loads(0, 0, 0), []) for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    assert router.choose(loads(0, 5, 0, live=[False, True, True]), []) == "r2"
    assert router.choose(loads(0, 0, live=[False, False]), []) is None


def test_prefix_sticks_to_the_holder_within_the_margin():
    router = Router("prefix", load_margin=2)
    keys = prefix_block_keys(list(range(64)), BS)
    assert router.choose(loads(1, 0), keys) == "r1"             # unknown prefix: least loaded
    assert router.choose(loads(0, 2), keys) == "r1"             # holder busier by 2 <= margin: stays
    assert router.choose(loads(0, 3), keys) == "r0"             # busier by 3 > margin: least loaded, which now holds it
    assert router.choose(loads(5, 0), keys[:2] + [b"other"]) == "r1"   # a shorter match elsewhere loses to load
    assert router.choose(loads(0, 0, live=[True, False]), keys) == "r0"


def test_prefix_holder_that_went_down_is_forgotten():
    router = Router("prefix", load_margin=10)
    keys = prefix_block_keys(list(range(32)), BS)
    assert router.choose(loads(0, 1), keys) == "r0"
    router.forget("r0")
    assert router.choose(loads(1, 0), keys) == "r1"


def test_bad_policy_and_margin_are_refused():
    assert POLICIES == ("prefix", "least_loaded", "round_robin")
    with pytest.raises(ValueError, match="routing policy"):
        Router("random")
    with pytest.raises(ValueError, match="margin"):
        Router("prefix", load_margin=-1)


def simulate_cached_tokens(policy: str, groups: int, per_group: int, prefix_blocks: int, replicas: int = 2) -> int:
    """Requests of `groups` shared prefixes (each + a unique block), interleaved, served one at a time. Each replica
    caches every full block it has seen (an unbounded prefix cache); a request's cached tokens are its leading
    blocks found on the replica it was sent to, as the engine counts them."""
    router = Router(policy)
    caches = [set() for _ in range(replicas)]
    total = 0
    for j in range(per_group):
        for g in range(groups):
            tokens = [1000 * g + t for t in range(prefix_blocks * BS)] + [500_000 + 100 * g + j] * BS
            keys = prefix_block_keys(tokens, BS)
            name = router.choose([ReplicaLoad(f"r{i}") for i in range(replicas)], keys)
            cache = caches[int(name[1:])]
            hit = 0
            while hit < len(keys) and keys[hit] in cache:
                hit += 1
            total += hit * BS
            cache.update(keys)
    return total


def test_prefix_aware_beats_round_robin_on_cached_tokens():
    groups, per_group, prefix_blocks = 3, 6, 4
    prefix = simulate_cached_tokens("prefix", groups, per_group, prefix_blocks)
    round_robin = simulate_cached_tokens("round_robin", groups, per_group, prefix_blocks)
    # Prefix-aware: every request after a group's first finds the whole shared prefix.
    assert prefix == groups * (per_group - 1) * prefix_blocks * BS
    # Round-robin: each group's prefix is computed once on each of the two replicas it visits.
    assert round_robin == groups * (per_group - 2) * prefix_blocks * BS
    assert prefix > round_robin
