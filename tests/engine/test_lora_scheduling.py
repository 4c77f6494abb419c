"""LoRA adapters in the scheduler and the prefix cache, on exact state: keys per adapter, no KV shared across
adapters, at most max_loras adapters running, and which requests still use an adapter."""
from __future__ import annotations

import pytest

from engine_svc.core.block_hash import ROOT, block_key, extend_block_hashes
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams, TokenLogprob
from engine_svc.core.scheduler import Scheduler, SchedulerConfig

EOS = 99
P = SamplingParams(max_tokens=4)


def make(max_loras=None, num_blocks=32, block_size=4, max_num_seqs=8, caching=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_model_len=64,
                          max_loras=max_loras)
    return Scheduler(cfg, kv, frozenset({EOS}))


def plan(out):
    return [(s.request.request_id, s.adapter, s.start, s.num_new_tokens) for s in out.scheduled]


def step(s, token=7):
    out = s.schedule()
    return out, s.update(out, [token] * sum(x.samples for x in out.scheduled))


def test_adapter_seeds_the_first_key_and_every_later_key_chains_through_it():
    tokens = list(range(12))
    base, a, b, salted, a_salted = [], [], [], [], []
    extend_block_hashes(base, tokens, 4)
    extend_block_hashes(a, tokens, 4, adapter="a")
    extend_block_hashes(b, tokens, 4, adapter="b")
    extend_block_hashes(salted, tokens, 4, extra="a")
    extend_block_hashes(a_salted, tokens, 4, extra="t", adapter="a")
    assert base[0] == block_key(ROOT, [0, 1, 2, 3])           # no adapter: the base model's keys are unchanged
    assert a[0] == block_key(ROOT, [0, 1, 2, 3], adapter="a")
    assert a[1] == block_key(a[0], [4, 5, 6, 7])              # only the first block takes the adapter
    chains = [base, a, b, salted, a_salted]
    for i in range(3):                                        # all five differ at every block
        assert len({c[i] for c in chains}) == 5
    # Length-prefixed fields: a salt cannot pose as a salt-and-adapter pair.
    assert block_key(ROOT, [1], extra="t\x00adapter\x00a") != block_key(ROOT, [1], extra="t", adapter="a")


def test_prefix_cache_is_shared_within_an_adapter_and_never_across():
    s = make()
    prompt = list(range(10, 22))                               # 12 tokens: 3 full blocks
    s.add_request("a1", prompt, P, adapter="a")
    step(s)
    assert s.requests["a1"].block_ids == [0, 1, 2]
    s.add_request("a2", prompt, P, adapter="a")
    s.add_request("b", prompt, P, adapter="b")
    s.add_request("base", prompt, P)
    out, _ = step(s)
    assert plan(out) == [("a1", "a", 12, 1), ("a2", "a", 8, 4), ("b", "b", 0, 12), ("base", None, 0, 12)]
    assert s.requests["a2"].block_ids[:2] == [0, 1]          # a's cached blocks, by reference
    assert set(s.requests["b"].block_ids).isdisjoint({0, 1, 2})
    assert set(s.requests["base"].block_ids).isdisjoint({0, 1, 2} | set(s.requests["b"].block_ids))
    assert out.adapters == {"a", "b"}


def test_at_most_max_loras_adapters_run_and_the_others_step_over_the_one_that_waits():
    s = make(max_loras=2)
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2), adapter="a")
    s.add_request("b", [1, 2, 3], SamplingParams(max_tokens=5), adapter="b")
    s.add_request("c", [1, 2, 3], P, adapter="c")              # a third adapter: waits
    s.add_request("base", [1, 2, 3], P)                        # behind it, but joins
    s.add_request("a-again", [1, 2, 3], P, adapter="a")        # its adapter already runs: joins
    out, _ = step(s)
    assert [r for r, *_ in plan(out)] == ["a", "b", "base", "a-again"]
    assert [r.request_id for r in s.waiting] == ["c"] and out.adapters == {"a", "b"}
    out, _ = step(s)                                           # a finishes (2 tokens); a-again still holds "a"
    assert "a" not in s.requests and [r.request_id for r in s.waiting] == ["c"]
    step(s)
    step(s)                                                    # a-again and base finish: "a" leaves the batch
    assert "a-again" not in s.requests and "base" not in s.requests
    out, _ = step(s)
    assert [(r, ad) for r, ad, *_ in plan(out)] == [("b", "b"), ("c", "c")]
    assert s.waiting == [] and out.adapters == {"b", "c"}


def test_base_model_requests_never_count_against_max_loras():
    s = make(max_loras=1)
    s.add_request("a", [1, 2], P, adapter="a")
    for i in range(4):
        s.add_request(f"base{i}", [1, 2], P)
    s.add_request("b", [1, 2], P, adapter="b")
    out, _ = step(s)
    assert [r for r, *_ in plan(out)] == ["a", "base0", "base1", "base2", "base3"]
    assert [r.request_id for r in s.waiting] == ["b"]


def test_groups_and_beam_forks_carry_the_adapter():
    s = make()
    s.add_request("g", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, n=2, best_of=2, seed=1), adapter="a")
    step(s)
    out, _ = step(s)                                           # member 1 joins on member 0's blocks
    assert [(r, ad) for r, ad, *_ in plan(out)] == [("g#0", "a"), ("g#1", "a")]
    s.abort("g")
    s.add_request("beam", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, temperature=0.0, use_beam_search=True,
                                                          best_of=2), adapter="b")
    out = s.schedule()
    top = ((7, -0.1), (8, -0.2))                               # both candidates survive: the beam forks
    s.update(out, [7], [TokenLogprob(7, -0.1, top)])
    members = s.groups["beam"].members
    assert len(members) == 2 and [m.adapter for m in members] == ["b", "b"]
    assert members[0].request_id != members[1].request_id


def test_uses_adapter_follows_waiting_running_finished_and_aborted():
    s = make(max_loras=1)
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1), adapter="a")
    s.add_request("b", [1, 2, 3], P, adapter="b")
    assert s.uses_adapter("a") and s.uses_adapter("b") and not s.uses_adapter("c")
    step(s)                                                    # a runs and finishes; b waited
    assert not s.uses_adapter("a") and s.uses_adapter("b")
    step(s)
    assert s.requests["b"].status.value == "running"
    s.abort("b")
    assert not s.uses_adapter("b") and s.kv.num_used_blocks == 0


def test_max_loras_must_be_positive():
    with pytest.raises(ValueError, match="max_loras"):
        SchedulerConfig(max_loras=0)
