"""BlockPool and KVCacheManager on exact state."""
from __future__ import annotations

import pytest

from engine_svc.core.block_pool import BlockPool
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import Request, SamplingParams


def req(n_tokens: int, rid: str = "r") -> Request:
    return Request(rid, list(range(n_tokens)), SamplingParams(), arrival=0)


def test_pool_allocates_from_head_and_frees_to_tail():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    pool.free([3, 1])
    assert pool.free_block_ids() == [5, 3, 1]
    assert [pool.ref_count(b) for b in range(6)] == [1, 0, 1, 0, 1, 0]
    assert pool.allocate(2) == [5, 3]
    assert (pool.num_free, pool.num_used) == (1, 5)


def test_pool_refuses_overdraw_without_side_effects():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.free_block_ids() == [2]


def test_pool_rejects_double_free():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError):
        pool.free([b])


def test_manager_block_table_grows_at_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req(6)
    assert kv.allocate_slots(r, 6)
    assert r.block_ids == [0, 1]
    r.num_computed_tokens = 6
    assert kv.allocate_slots(r, 1)          # position 6 still in block 1
    assert r.block_ids == [0, 1]
    r.num_computed_tokens = 8
    assert kv.allocate_slots(r, 1)          # position 8 opens block 2
    assert r.block_ids == [0, 1, 2]
    assert kv.num_free_blocks == 5


def test_manager_out_of_blocks_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = req(8, "a"), req(8, "b")
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)
    assert b.block_ids == [] and kv.num_free_blocks == 1


def test_manager_free_returns_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    r = req(6)
    kv.allocate_slots(r, 6)
    assert r.block_ids == [0, 1, 2]
    kv.free(r)
    assert r.block_ids == [] and kv.pool.free_block_ids() == [3, 2, 1, 0]
