"""Automatic prefix caching on exact state: keys, hits, partial tails, shared refcounts, LRU eviction, cache_salt,
stats, and the integrity check."""
from __future__ import annotations

import random

from engine_svc.core.block_hash import ROOT, block_key, extend_block_hashes
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams
from engine_svc.core.scheduler import Scheduler, SchedulerConfig

EOS = 99
P = SamplingParams(max_tokens=4)


def make(num_blocks=16, block_size=4, caching=True, budget=64, max_num_seqs=8):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=64)
    return Scheduler(cfg, kv, frozenset({EOS}))


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def step(s, token=7):
    out = s.schedule()
    return out, s.update(out, [token] * sum(x.samples for x in out.scheduled))


def random_operations(s, rng, prefixes, salts, count=400):
    """count random operations (a request on a shared prefix, an abort, a step that finishes or continues), the
    scheduler's integrity checked after each; then every request is aborted."""
    n = 0
    for _ in range(count):
        r = rng.random()
        if r < 0.25:
            prompt = rng.choice(prefixes) + [rng.randrange(90) for _ in range(rng.randrange(1, 8))]
            s.add_request(f"r{n}", prompt, SamplingParams(max_tokens=rng.randrange(1, 10)),
                          cache_salt=rng.choice(salts))
            n += 1
        elif r < 0.32 and s.requests:
            s.abort(rng.choice(list(s.requests)))
        elif s.has_work:
            step(s, token=rng.choice([7, 8, EOS]))
        assert s.check_integrity() == []
    for rid in list(s.requests):
        s.abort(rid)


def run_alone(s, rid, prompt, params=P):
    s.add_request(rid, prompt, params)
    while rid in s.requests:
        step(s)


def test_keys_chain_over_parents_and_salt():
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 9, 9]
    ha, hb = [], []
    extend_block_hashes(ha, a, 4)
    extend_block_hashes(hb, b, 4)
    assert len(ha) == 2                                  # the 9th token is a partial block: no key
    assert ha[0] == hb[0] and ha[1] != hb[1]
    assert ha[1] == block_key(ha[0], [5, 6, 7, 8])
    assert block_key(ROOT, [5, 6, 7, 8]) != ha[1]        # same tokens, other parent
    salted = []
    extend_block_hashes(salted, a, 4, extra="tenant-1")
    assert salted[0] != ha[0] and salted[1] != ha[1]    # the salt reaches every later key through the chain
    extend_block_hashes(ha, a + [10, 11, 12], 4)          # incremental: only the new full block is added
    assert len(ha) == 3 and ha[2] == block_key(ha[1], [9, 10, 11, 12])


def test_hit_reuses_full_blocks_and_shares_refcounts():
    s = make()
    prompt = list(range(10, 20))                     # 10 tokens: blocks 0, 1 full, block 2 partial
    s.add_request("a", prompt, SamplingParams(max_tokens=20))
    step(s)
    a = s.requests["a"]
    assert a.block_ids == [0, 1, 2] and s.kv.pool.num_cached == 2
    s.add_request("b", prompt[:8] + [50, 51, 52], P)  # same two full blocks, another tail
    out, _ = step(s)
    assert plan(out) == [("a", 10, 1, True), ("b", 8, 3, True)]
    b = s.requests["b"]
    assert b.block_ids == [0, 1, 3] and b.num_cached_tokens == 8
    assert [s.kv.pool.ref_count(x) for x in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert (s.kv.prefix_stats.queries, s.kv.prefix_stats.hits) == (21, 8)
    s.abort("a")
    assert [s.kv.pool.ref_count(x) for x in (0, 1, 2, 3)] == [1, 1, 0, 1]
    s.abort("b")
    assert s.kv.num_used_blocks == 0
    assert s.kv.pool.num_cached_idle == 2 and s.kv.pool.num_free == 14   # the partial tails are not cached


def test_partial_tail_and_aligned_prompt_leave_a_token_to_compute():
    s = make()
    run_alone(s, "a", list(range(8)))                 # 8 tokens = 2 full blocks (+ 4 generated)
    s.add_request("same", list(range(8)), P)          # all cached, but the last token must be computed
    out, _ = step(s)
    assert plan(out) == [("same", 4, 4, True)]        # hit block 0 only; block 1 is recomputed in a new block
    assert s.requests["same"].block_ids[0] == 0 and s.requests["same"].block_ids[1] != 1
    s.add_request("tail", list(range(10)), P)         # 2 full blocks cached + a partial tail of 2
    out, _ = step(s)
    assert ("tail", 8, 2, True) in plan(out)


def test_generated_tokens_are_cached_too():
    s = make()
    run_alone(s, "a", [1, 2, 3, 4, 5, 6], P)          # 6 prompt + 4 outputs: 10 tokens, 9 computed
    a_tokens = [1, 2, 3, 4, 5, 6, 7, 7, 7, 7]
    s.add_request("b", a_tokens + [40], P)           # a multi-turn follow-up: prompt = previous turn + more
    out, _ = step(s)
    assert plan(out) == [("b", 8, 3, True)]


def test_cache_salt_isolates_tenants():
    s = make()
    s.add_request("a", list(range(12)), P, cache_salt="t1")
    step(s)
    s.add_request("b", list(range(12)), P, cache_salt="t2")
    s.add_request("c", list(range(12)), P)
    s.add_request("d", list(range(12)), P, cache_salt="t1")
    out, _ = step(s)
    starts = {rid: start for rid, start, _, _ in plan(out)}
    assert starts["b"] == 0 and starts["c"] == 0 and starts["d"] == 8


def test_lru_eviction_takes_tail_blocks_of_the_oldest_first():
    s = make(num_blocks=8)
    run_alone(s, "a", list(range(100, 108)), SamplingParams(max_tokens=1))   # blocks 0, 1 cached
    run_alone(s, "b", list(range(200, 208)), SamplingParams(max_tokens=1))   # blocks 2, 3 cached
    pool = s.kv.pool
    assert pool.num_cached == 4 and pool.num_cached_idle == 4
    # Eviction order: untouched free blocks first, then a's tail, a's head, b's tail, b's head.
    assert pool.free_block_ids() == [4, 5, 6, 7, 1, 0, 3, 2]
    s.add_request("c", list(range(300, 323)), SamplingParams(max_tokens=2))  # 23 tokens: 6 blocks
    step(s)
    assert s.requests["c"].block_ids == [4, 5, 6, 7, 1, 0]
    assert pool.num_evictions == 2 and pool.num_cached == 2 + 5       # b's two, and c's own full blocks
    s.abort("c")
    s.add_request("b2", list(range(200, 208)) + [1], P)   # b's prefix survived
    out, _ = step(s)
    assert plan(out) == [("b2", 8, 1, True)]
    s.add_request("a2", list(range(100, 108)) + [1], P)   # a's did not
    out, _ = step(s)
    assert ("a2", 0, 9, True) in plan(out)


def test_reviving_a_cached_block_counts_against_the_pool():
    s = make(num_blocks=4)
    run_alone(s, "a", list(range(8)), SamplingParams(max_tokens=1))          # blocks 0, 1 cached, idle
    assert s.kv.num_free_blocks == 4
    s.add_request("b", list(range(8)) + [9], SamplingParams(max_tokens=4))   # hits 0, 1 and needs 1 more
    step(s)
    b = s.requests["b"]
    assert b.block_ids[:2] == [0, 1] and len(b.block_ids) == 3 and s.kv.num_free_blocks == 1


def test_no_prefix_caching_never_hits():
    s = make(caching=False)
    run_alone(s, "a", list(range(12)))
    s.add_request("b", list(range(12)), P)
    out, _ = step(s)
    assert plan(out) == [("b", 0, 12, True)]
    assert s.kv.pool.num_cached == 0 and s.kv.prefix_stats.queries == 0


def test_identical_prompts_in_one_step_keep_one_cached_copy():
    s = make()
    s.add_request("a", list(range(8)) + [1], P)
    s.add_request("b", list(range(8)) + [2], P)
    step(s)                                           # both computed at once: no hit possible yet
    a, b = s.requests["a"], s.requests["b"]
    assert a.block_ids[:2] == [0, 1] and b.block_ids[:2] == [3, 4]
    assert s.kv.pool.lookup(a.block_hashes[0]) == 0   # the first stays the cached one; b's stay private
    s.abort("a")
    s.abort("b")
    assert s.kv.pool.num_cached_idle == 2 and s.kv.check_integrity([]) == []


def test_integrity_after_random_mixes_of_finish_abort_and_preemption():
    rng = random.Random(0)
    s = make(num_blocks=12, block_size=4, budget=10, max_num_seqs=4)
    prefixes = [[rng.randrange(90) for _ in range(rng.choice([4, 8, 9]))] for _ in range(3)]
    random_operations(s, rng, prefixes, salts=["", "x"])
    kv = s.kv
    assert s.num_preemptions > 0 and kv.prefix_stats.hits > 0 and kv.pool.num_evictions > 0
    assert kv.num_used_blocks == 0 and kv.pool.num_free + kv.pool.num_cached_idle == kv.num_blocks
    assert kv.check_integrity([]) == []


def test_integrity_check_reports_a_leak():
    s = make()
    s.add_request("a", list(range(6)), P)
    step(s)
    a = s.requests["a"]
    assert s.check_integrity() == []
    s.running.remove(a)                    # forget a request without freeing its blocks: a leak
    problems = s.check_integrity()
    assert any("block 0: ref count 1, live tables hold 0" in p for p in problems)
    assert any("idle" in p for p in problems)
