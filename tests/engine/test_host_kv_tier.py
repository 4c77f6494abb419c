"""The host KV tier (--kv-offload-gb) on exact state: offload on eviction, hits served from the host, LRU on both
tiers, pinned slots, salt isolation, a failed step's copies forgotten, and integrity over random operations."""
from __future__ import annotations

import random

import pytest

from engine_svc.core.host_kv_tier import HostTier
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams
from engine_svc.core.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_prefix_cache import EOS, plan, random_operations, run_alone, step

ONE = SamplingParams(max_tokens=1)


def make(num_blocks=4, host=4, block_size=4, budget=64, max_num_seqs=8):
    kv = KVCacheManager(num_blocks, block_size, num_host_blocks=host)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=64)
    return Scheduler(cfg, kv, frozenset({EOS}))


def test_evicted_block_goes_to_the_host_and_a_hit_is_loaded_back():
    s = make()
    run_alone(s, "a", list(range(100, 108)), ONE)      # a's blocks 0, 1 cached and idle
    assert s.kv.pool.free_block_ids() == [2, 3, 1, 0] and s.kv.host.lru_keys() == []
    s.add_request("b", list(range(200, 212)), ONE)     # 3 blocks: 2, 3, then block 1 (a's tail) is evicted
    out = s.schedule()
    assert s.requests["b"].block_ids == [2, 3, 1]
    assert (out.kv_copies.offloads, out.kv_copies.loads) == ([(1, 0)], [])   # block 1 -> host slot 0
    s.update(out, [7])
    tail_key = s.kv.host.lru_keys()[0]
    assert s.kv.host.slot(tail_key) == 0 and s.kv.pool.lookup(tail_key) is None

    s.add_request("a2", list(range(100, 108)) + [1], SamplingParams(max_tokens=2))
    out = s.schedule()
    # Block 0 is a device hit; the next key is in host slot 0, loaded into a fresh device block (1, whose cached
    # contents, b's tail, are offloaded first, to slot 1); a2's own third block evicts b's block 3 (to slot 2).
    assert plan(out) == [("a2", 8, 1, True)]
    assert s.requests["a2"].block_ids == [0, 1, 3]
    assert out.kv_copies.offloads == [(1, 1), (3, 2)] and out.kv_copies.loads == [(0, 1)]
    assert s.kv.pool.lookup(tail_key) == 1              # indexed on the device at once
    assert s.kv.host.is_pinned(0) and s.kv.host.num_pinned == 1
    assert s.requests["a2"].num_cached_tokens == 8 and s.kv.prefix_stats.hits == 8
    s.update(out, [7])
    assert s.kv.host.num_pinned == 0 and s.kv.host.stats.loaded_blocks == 1
    assert s.kv.host.stats.offloaded_blocks == 3
    assert s.kv.check_integrity([r for r in s.running if r.block_ids]) == []


def test_host_lru_stores_once_touches_on_use_and_evicts_the_oldest():
    tier = HostTier(2)
    assert (tier.store(b"k1"), tier.store(b"k2")) == (0, 1)
    assert tier.store(b"k1") is None and tier.lru_keys() == [b"k2", b"k1"]   # already here: only touched
    assert tier.store(b"k3") == 1 and tier.lru_keys() == [b"k1", b"k3"]     # k2 was the oldest
    assert tier.take_for_load(b"k1") == 0 and tier.lru_keys() == [b"k3", b"k1"]
    tier.release([0])
    assert tier.store(b"k4") == 1 and tier.slot(b"k3") is None
    assert tier.stats.evictions == 2 and tier.check() == []


def test_a_slot_being_read_is_never_handed_out_again():
    tier = HostTier(1)
    tier.store(b"k1")
    assert tier.take_for_load(b"k1") == 0
    assert tier.store(b"k2") is None and tier.stats.dropped_offloads == 1   # pinned: the offload drops
    assert tier.slot(b"k1") == 0
    tier.release([0])
    assert tier.store(b"k2") == 0 and tier.slot(b"k1") is None
    with pytest.raises(ValueError):
        tier.release([0])


def test_loads_of_a_step_in_flight_keep_their_slots_and_blocks_through_the_next_schedule():
    s = make(num_blocks=4, host=2)
    run_alone(s, "a", list(range(100, 108)), ONE)
    run_alone(s, "b", list(range(200, 212)), ONE)      # evicts a's tail (slot 0)
    a_tail = s.kv.host.lru_keys()[0]
    s.add_request("a2", list(range(100, 108)) + [1], ONE)
    first = s.schedule()                                # not yet applied: a step in flight
    (slot, block), = first.kv_copies.loads
    assert s.kv.host.slot(a_tail) == slot and s.kv.host.is_pinned(slot)
    # A second request churns the device pool while the first step is in flight: its evictions fill the host
    # tier's free slot and then find only the pinned one, so they drop rather than overwrite it.
    s.add_request("c", list(range(300, 305)), ONE)
    second = s.schedule()
    assert block not in s.requests["c"].block_ids and s.kv.pool.ref_count(block) == 1
    assert all(dst != slot for _, dst in second.kv_copies.offloads)
    assert s.kv.host.slot(a_tail) == slot
    s.update(first, [7])
    s.update(second, [7])
    assert s.kv.host.num_pinned == 0


def test_offloads_to_one_slot_in_one_step_keep_only_the_last():
    s = make(num_blocks=3, host=1, block_size=2)
    run_alone(s, "a", [10, 11, 12, 13, 14], ONE)       # blocks 0, 1 cached; free queue [2, 1, 0]
    s.add_request("b", [20, 21, 22, 23, 24], ONE)      # takes all three: evicts 1, then 0, into the one slot
    out = s.schedule()
    assert out.kv_copies.offloads == [(0, 0)] and s.kv.host.stats.evictions == 1
    assert s.kv.host.lru_keys() == [s.kv.host.key_in(0)] and s.kv.host.stats.offloaded_blocks == 2


def test_cache_salt_holds_in_the_host_tier():
    s = make(num_blocks=4, host=4)
    run_alone(s, "a", list(range(100, 108)), ONE)
    run_alone(s, "b", list(range(200, 212)), ONE)      # evicts a's blocks to the host
    s.add_request("x", list(range(100, 108)) + [1], ONE, cache_salt="tenant")
    out = s.schedule()
    assert plan(out) == [("x", 0, 9, True)] and out.kv_copies.loads == []
    s.update(out, [7])
    s.add_request("y", list(range(100, 108)) + [1], ONE)
    out = s.schedule()
    assert plan(out) == [("y", 8, 1, True)] and len(out.kv_copies.loads) == 2


def test_a_failed_steps_copies_are_forgotten_in_both_tiers():
    s = make()
    run_alone(s, "a", list(range(100, 108)), ONE)
    run_alone(s, "b", list(range(200, 212)), ONE)
    a_tail = s.kv.host.lru_keys()[0]
    s.add_request("a2", list(range(100, 108)) + [1], ONE)
    out = s.schedule()
    offloaded = [s.kv.host.key_in(slot) for _, slot in out.kv_copies.offloads]
    s.kv.abandon_copies([out.kv_copies])
    s.fail("a2", "boom")
    assert s.kv.pool.lookup(a_tail) is None and s.kv.host.num_pinned == 0
    assert all(s.kv.host.slot(k) is None for k in offloaded)
    assert s.kv.host.slot(a_tail) is not None          # the slot it was read from still holds it
    assert s.kv.check_integrity([]) == []


def test_integrity_after_400_random_operations_with_the_tier_on():
    rng = random.Random(0)
    s = make(num_blocks=10, host=6, block_size=4, budget=10, max_num_seqs=4)
    prefixes = [[rng.randrange(90) for _ in range(rng.choice([4, 8, 9, 12]))] for _ in range(6)]
    random_operations(s, rng, prefixes, salts=["", "", "x"])
    kv = s.kv
    stats = kv.host.stats
    assert stats.offloaded_blocks > 0 and stats.loaded_blocks > 0 and stats.evictions > 0
    assert kv.num_used_blocks == 0 and kv.host.num_pinned == 0 and kv.check_integrity([]) == []
