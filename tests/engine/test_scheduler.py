"""Scheduler on exact state: admission, continuous batching, finishing, aborts, running out of blocks, preemption."""
from __future__ import annotations

import pytest

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import FinishReason, RequestStatus, SamplingParams
from engine_svc.core.scheduler import AdmissionError, Scheduler, SchedulerConfig

EOS = 99


def make(num_blocks=8, block_size=4, max_num_seqs=4, max_model_len=32):
    # Prefix caching off: these prompts repeat tokens, and hits are covered in test_prefix_cache.py.
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(64, max_model_len),
                          max_model_len=max_model_len)
    return Scheduler(cfg, kv, frozenset({EOS}))


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def step(s, token=7):
    out = s.schedule()
    sampled = [token] * sum(x.samples for x in out.scheduled)
    return out, s.update(out, sampled)


P = SamplingParams(max_tokens=100)
SHORT = SamplingParams(max_tokens=4)   # for tiny caches: a request must fit alone at prompt + max_tokens


def test_prefill_then_decode_with_exact_blocks():
    s = make()
    s.add_request("a", [1, 2, 3, 4, 5], P)
    out, res = step(s)
    assert plan(out) == [("a", 0, 5, True)]
    a = s.requests["a"]
    assert a.block_ids == [0, 1] and a.num_computed_tokens == 5 and a.token_ids == [1, 2, 3, 4, 5, 7]
    assert [(r.request_id, r.new_token_ids, r.finish_reason) for r in res] == [("a", [7], None)]
    out, _ = step(s)
    assert plan(out) == [("a", 5, 1, True)]
    assert a.block_ids == [0, 1] and a.num_computed_tokens == 6
    for _ in range(2):
        step(s)
    assert a.num_computed_tokens == 8 and a.block_ids == [0, 1]
    step(s)                                   # position 8 needs a third block
    assert a.block_ids == [0, 1, 2]


def test_request_joins_mid_batch():
    s = make()
    s.add_request("a", [1, 2, 3], P)
    step(s)
    step(s)
    s.add_request("b", [4, 5], P)
    out, res = step(s)
    assert plan(out) == [("a", 4, 1, True), ("b", 0, 2, True)]
    assert [r.request_id for r in res] == ["a", "b"]
    assert [r.request_id for r in s.running] == ["a", "b"]
    assert s.requests["a"].block_ids == [0, 1] and s.requests["b"].block_ids == [2]


def test_finishing_frees_blocks_at_once():
    s = make()
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    s.add_request("b", [1, 2, 3, 4, 5, 6], P)
    step(s)
    out, res = step(s)
    fin = {r.request_id: r.finish_reason for r in res}
    assert fin == {"a": FinishReason.LENGTH, "b": None}
    assert "a" not in s.requests and [r.request_id for r in s.running] == ["b"]
    assert s.kv.num_used_blocks == 2 and s.kv.pool.free_block_ids()[-1:] == [0]


def test_eos_and_stop_token_finish():
    s = make()
    s.add_request("a", [1], P)
    s.add_request("b", [2], SamplingParams(max_tokens=100, stop_token_ids=frozenset({5})))
    s.add_request("c", [3], SamplingParams(max_tokens=100, ignore_eos=True))
    out = s.schedule()
    res = s.update(out, [EOS, 5, EOS])
    assert [(r.request_id, r.finish_reason) for r in res] == [
        ("a", FinishReason.STOP_TOKEN), ("b", FinishReason.STOP_TOKEN), ("c", None)]
    assert list(s.requests) == ["c"]


def test_context_limit_finishes_with_length():
    s = make(max_model_len=8)
    s.add_request("a", [1] * 6, P)
    _, res = step(s)
    assert res[0].finish_reason is None
    _, res = step(s)
    assert res[0].finish_reason is FinishReason.LENGTH and s.kv.num_used_blocks == 0


def test_abort_frees_blocks_and_skips_request():
    s = make()
    s.add_request("a", [1, 2, 3, 4, 5], P)
    s.add_request("b", [1, 2], P)
    step(s)
    assert s.abort("a")
    assert s.kv.num_used_blocks == 1 and s.requests["b"].block_ids == [2]
    out, _ = step(s)
    assert plan(out) == [("b", 2, 1, True)]
    assert not s.abort("a")
    s.add_request("w", [1], P)
    s.add_request("x", [1] * 20, P)
    assert s.abort("x") and [r.request_id for r in s.waiting] == ["w"]


def test_out_of_blocks_waits_then_joins():
    s = make(num_blocks=4, block_size=4)
    s.add_request("a", [1] * 12, SHORT)      # 3 blocks
    s.add_request("b", [1] * 6, SHORT)       # needs 2: only 1 free
    out, _ = step(s)
    assert plan(out) == [("a", 0, 12, True)]
    assert [r.request_id for r in s.waiting] == ["b"] and s.requests["b"].status is RequestStatus.WAITING
    s.abort("a")
    out, _ = step(s)
    assert plan(out) == [("b", 0, 6, True)] and s.requests["b"].block_ids == [3, 2]


def test_max_num_seqs_caps_the_batch():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add_request(rid, [1], P)
    out, _ = step(s)
    assert [x[0] for x in plan(out)] == ["a", "b"] and [r.request_id for r in s.waiting] == ["c"]


def test_preempts_newest_and_resumes_with_its_tokens():
    s = make(num_blocks=3, block_size=2, max_model_len=16)
    s.add_request("a", [1, 2], SHORT)
    s.add_request("b", [3, 4], SHORT)
    step(s)                       # a: [0], b: [1]; both hold 3 tokens now (2 prompt + 1 sampled)
    out, _ = step(s)              # a needs block 2 for position 2; b needs a block too -> b preempted
    assert plan(out) == [("a", 2, 1, True)]
    assert out.preempted[0].request_id == "b"
    b = s.requests["b"]
    assert b.status is RequestStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.token_ids == [3, 4, 7] and s.num_preemptions == 1
    assert s.requests["a"].block_ids == [0, 2]
    s.abort("a")
    out, _ = step(s)              # b recomputes prompt + its generated token, then samples the next
    assert plan(out) == [("b", 0, 3, True)]
    assert b.token_ids == [3, 4, 7, 7] and len(b.block_ids) == 2


def test_admission_errors():
    s = make(num_blocks=2, block_size=4, max_model_len=32)
    with pytest.raises(AdmissionError) as e:
        s.add_request("a", [], P)
    assert not e.value.no_capacity
    with pytest.raises(AdmissionError) as e:
        s.add_request("a", [1] * 32, P)
    assert not e.value.no_capacity
    with pytest.raises(AdmissionError) as e:
        s.add_request("a", [1] * 8, SHORT)      # 8 + 4 tokens need 3 blocks; the cache has 2
    assert e.value.no_capacity and "3 KV blocks" in str(e.value)
    with pytest.raises(AdmissionError) as e:
        s.add_request("a", [1], P)              # capped by the context: 32 tokens need 8 blocks
    assert e.value.no_capacity and "8 KV blocks" in str(e.value)
    s.add_request("a", [1], SHORT)
    with pytest.raises(AdmissionError):
        s.add_request("a", [1], SHORT)


def test_waiting_queue_is_bounded():
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=32, max_waiting=2),
                  kv, frozenset({EOS}))
    s.add_request("a", [1], SHORT)
    s.add_request("b", [1], SHORT)
    with pytest.raises(AdmissionError, match="waiting queue is full") as e:
        s.add_request("c", [1], SHORT)
    assert e.value.no_capacity and "c" not in s.requests
    step(s)                                  # a runs (max_num_seqs 1): one seat in the queue again
    s.add_request("c", [1], SHORT)
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_priority_orders_waiting_and_preemption():
    s = make(num_blocks=4, block_size=2, max_num_seqs=2, max_model_len=16)
    p6 = SamplingParams(max_tokens=6)        # 2 + 6 tokens: 4 blocks, the whole cache
    s.add_request("low", [1, 2], p6, priority=5)
    s.add_request("mid", [3, 4], p6, priority=0)
    s.add_request("high", [5, 6], p6, priority=-1)
    assert [r.request_id for r in s.waiting] == ["high", "mid", "low"]
    out, _ = step(s)
    assert [x[0] for x in plan(out)] == ["high", "mid"]
    s.abort("mid")
    s.add_request("urgent", [7, 8], p6, priority=-2)
    out, _ = step(s)                         # urgent jumps the queue ahead of low
    assert [x[0] for x in plan(out)] == ["high", "urgent"]
    assert [r.request_id for r in s.running] == ["urgent", "high"]
    step(s)
    assert s.kv.num_free_blocks == 0         # high: 2 blocks, urgent: 2 blocks
    out, _ = step(s)                         # high needs a third block: it is the lowest priority, so it yields
    assert [r.request_id for r in out.preempted] == ["high"] and plan(out) == [("urgent", 3, 1, True)]
    assert [r.request_id for r in s.waiting] == ["high", "low"]
