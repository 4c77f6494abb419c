"""Chunked prefill on exact state: chunk boundaries, the shared token budget, decodes never stalled by a long
prompt, preemption mid-prefill, and the no-chunking mode."""
from __future__ import annotations

import pytest

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams
from engine_svc.core.scheduler import Scheduler, SchedulerConfig

P = SamplingParams(max_tokens=8)


def make(budget, num_blocks=32, block_size=4, max_model_len=64, chunked=True, max_num_seqs=8):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                          enable_chunked_prefill=chunked)
    return Scheduler(cfg, kv, frozenset({99}))


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def step(s, token=7):
    out = s.schedule()
    return out, s.update(out, [token] * sum(x.samples for x in out.scheduled))


def test_long_prompt_is_computed_in_budget_sized_chunks():
    s = make(budget=8)
    s.add_request("a", list(range(20)), P)
    plans, blocks = [], []
    for _ in range(4):
        out, res = step(s)
        plans.append(plan(out))
        blocks.append(list(s.requests["a"].block_ids))
        if _ < 2:
            assert res == []                              # no token until the prompt is complete
    assert plans == [[("a", 0, 8, False)], [("a", 8, 8, False)], [("a", 16, 4, True)], [("a", 20, 1, True)]]
    assert blocks == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert s.requests["a"].token_ids[20:] == [7, 7]


def test_decodes_keep_their_token_while_a_long_prompt_arrives():
    s = make(budget=6)
    s.add_request("a", [1, 2], P)
    s.add_request("b", [3, 4], P)
    step(s)                                               # both prefilled: they decode from now on
    s.add_request("long", list(range(10, 24)), P)         # 14 tokens
    plans = [plan(step(s)[0]) for _ in range(4)]
    assert plans == [
        [("a", 2, 1, True), ("b", 2, 1, True), ("long", 0, 4, False)],
        [("a", 3, 1, True), ("b", 3, 1, True), ("long", 4, 4, False)],
        [("a", 4, 1, True), ("b", 4, 1, True), ("long", 8, 4, False)],
        [("a", 5, 1, True), ("b", 5, 1, True), ("long", 12, 2, True)],
    ]


def test_an_older_prefill_leaves_budget_for_younger_decodes():
    s = make(budget=5)
    s.add_request("old", list(range(12)), P)
    out, _ = step(s)
    assert plan(out) == [("old", 0, 5, False)]
    s.add_request("y1", [1], P)
    s.add_request("y2", [2], P)
    out, _ = step(s)                                      # the young ones join only with what is left
    assert plan(out) == [("old", 5, 5, False)]
    out, _ = step(s)
    assert plan(out) == [("old", 10, 2, True), ("y1", 0, 1, True), ("y2", 0, 1, True)]
    out, _ = step(s)                                      # now all decode
    assert plan(out) == [("old", 12, 1, True), ("y1", 1, 1, True), ("y2", 1, 1, True)]
    s.add_request("late", list(range(30, 40)), P)
    out, _ = step(s)
    assert plan(out) == [("old", 13, 1, True), ("y1", 2, 1, True), ("y2", 2, 1, True), ("late", 0, 2, False)]


def test_a_prefill_served_first_still_leaves_budget_for_decodes():
    s = make(budget=4)
    s.add_request("d", [1], P)
    step(s)                                               # d decodes from now on
    s.add_request("p", list(range(10)), P, priority=-1)   # served before d from now on
    out, _ = step(s)
    assert plan(out) == [("d", 1, 1, True), ("p", 0, 3, False)]
    assert [r.request_id for r in s.running] == ["p", "d"]
    out, _ = step(s)                                      # p comes first but leaves one token for d
    assert plan(out) == [("p", 3, 3, False), ("d", 2, 1, True)]


def test_preemption_mid_prefill_restarts_the_prompt():
    s = make(budget=4, num_blocks=4, block_size=2, max_model_len=16)
    s.add_request("a", [1, 2], SamplingParams(max_tokens=4))
    s.add_request("b", list(range(10, 14)), SamplingParams(max_tokens=2))
    out, _ = step(s)
    assert plan(out) == [("a", 0, 2, True), ("b", 0, 2, False)]
    out, _ = step(s)                                      # a: block for pos 2, b: block for pos 2,3 -> 4 used
    assert plan(out) == [("a", 2, 1, True), ("b", 2, 2, True)]
    out, _ = step(s)                                      # a needs block 3; none free: b (newest) is preempted
    assert plan(out) == [("a", 3, 1, True)] and [r.request_id for r in out.preempted] == ["b"]
    b = s.requests["b"]
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.token_ids == [10, 11, 12, 13, 7]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    with pytest.raises(ValueError, match="without chunked prefill"):
        make(budget=8, chunked=False, max_model_len=64)
    s = make(budget=16, chunked=False, max_model_len=16)
    s.add_request("a", [1], P)
    s.add_request("c", [2], P)
    step(s)
    s.add_request("b", list(range(15)), P)               # 15 tokens do not fit next to two decodes (16 - 2)
    out, _ = step(s)
    assert plan(out) == [("a", 1, 1, True), ("c", 1, 1, True)]
    s.abort("a")
    out, _ = step(s)
    assert plan(out) == [("c", 2, 1, True), ("b", 0, 15, True)]


def test_budget_counts_every_scheduled_token():
    s = make(budget=10, max_num_seqs=8)
    for i in range(4):
        s.add_request(f"r{i}", list(range(i * 10, i * 10 + 7)), P)
    for _ in range(6):
        out, _ = step(s)
        assert out.num_batched_tokens <= 10
