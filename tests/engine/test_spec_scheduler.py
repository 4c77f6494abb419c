"""Speculative decoding in the plain-Python core, on exact state: n-gram lookup, verify rows (1 + k tokens, the
proposals never in token_ids), k bounded by max_tokens, the context and the budget, acceptance and rejection
(num_computed_tokens, freed tail blocks, prefix cache of accepted tokens only), a stop inside an accepted run,
requests that do not speculate, and 300 random operations (accept, reject, abort, preempt) with the KV invariants
checked after each and no block used at the end; a proposer that raises for one request costs that request its
proposals alone."""
from __future__ import annotations

import logging
import random

import pytest

from engine_svc.config import EngineConfig, config_from_args
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import FinishReason, SamplingParams, StructuredOutput
from engine_svc.core.scheduler import Scheduler, SchedulerConfig
from engine_svc.spec.ngram_proposer import NgramProposer, ngram_lookup

EOS = 99


class Fixed:
    """Proposes the given tokens for every request (cut to k)."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.calls = []

    def propose(self, rows):
        self.calls.append([(r.request_id, k) for r, k in rows])
        return [list(self.tokens[:k]) for _, k in rows]


class FailsFor(Fixed):
    """Proposes like Fixed, but raises whenever its rows include request `bad`."""

    def __init__(self, tokens, bad):
        super().__init__(tokens)
        self.bad = bad

    def propose(self, rows):
        proposals = super().propose(rows)
        if any(r.request_id == self.bad for r, _ in rows):
            raise RuntimeError(f"planted for {self.bad}")
        return proposals


def make(proposer, k=3, num_blocks=32, block_size=4, max_model_len=64, caching=True, budget=64, seqs=4):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                                     num_speculative_tokens=k), kv, frozenset({EOS}), proposer=proposer)


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens, s.spec_token_ids) for s in out.scheduled]


def prefill(s, rid, prompt, first=7, **params):
    s.add_request(rid, prompt, SamplingParams(temperature=0.0, **{"max_tokens": 20, **params}))
    out = s.schedule()
    s.update(out, [first])
    return s.requests[rid]


def verify(s, out, runs):
    """Applies a step where runs maps request id -> its new tokens (accepted proposals + the target's)."""
    sampled = [runs[x.request.request_id][0] if x.spec_token_ids else 0 for x in out.scheduled if x.samples]
    return s.update(out, sampled, runs={rid: (toks, None) for rid, toks in runs.items()})


def test_ngram_lookup_takes_the_longest_earlier_match_and_prefers_a_full_continuation():
    assert ngram_lookup([1, 2, 3, 4, 9, 1, 2, 3], 1, 3, 2) == [4, 9]
    assert ngram_lookup([5, 1, 2, 7, 8, 6, 2, 8, 1, 2], 1, 2, 3) == [7, 8, 6]   # bigram [1, 2] beats unigram
    assert ngram_lookup([1, 2, 3], 1, 3, 2) == []
    # A run of one token: the latest occurrence overlaps the suffix; the latest with k tokens after it wins.
    assert ngram_lookup([4, 7, 7, 7, 7, 7], 2, 2, 3) == [7, 7, 7]
    assert ngram_lookup([4, 7, 7, 7], 2, 2, 3) == [7]   # none has 3 after it: the latest match
    assert NgramProposer(1, 2).propose([]) == []


def test_a_verify_row_is_granted_its_proposals_and_only_the_last_token_counts_as_computed():
    prop = Fixed([11, 12, 13])
    s = make(prop)
    a = prefill(s, "a", [1, 2, 3, 4, 5])
    assert a.token_ids == [1, 2, 3, 4, 5, 7] and a.num_computed_tokens == 5
    out = s.schedule()
    assert plan(out) == [("a", 5, 4, (11, 12, 13))]
    assert prop.calls[-1] == [("a", 3)]
    assert a.token_ids == [1, 2, 3, 4, 5, 7]          # proposals are never tokens before they are accepted
    assert a.num_computed_tokens == 6 and len(a.block_ids) == 3   # blocks hold positions 0..8
    # Two accepted, the third rejected: the target's token 20 replaces it.
    res = verify(s, out, {"a": [11, 12, 20]})
    assert [(r.new_token_ids, r.finish_reason) for r in res] == [([11, 12, 20], None)]
    assert a.token_ids == [1, 2, 3, 4, 5, 7, 11, 12, 20] and a.num_computed_tokens == 8
    assert len(a.block_ids) == 2 and s.kv.num_used_blocks == 2 and s.check_integrity() == []
    assert s.spec_stats.num_drafts == 1 and s.spec_stats.num_draft_tokens == 3
    assert s.spec_stats.num_accepted_tokens == 2 and s.spec_stats.accepted_per_pos == [1, 1, 0]
    assert s.spec_stats.mean_accepted_length == 3.0


def test_rejecting_everything_frees_the_tail_and_the_prefix_cache_never_holds_a_proposal():
    s = make(Fixed([11, 12, 13, 14, 15, 16]), k=6)
    a = prefill(s, "a", [1, 2, 3, 4, 5, 6, 7])        # 7 prompt tokens, first output 7
    out = s.schedule()
    assert plan(out) == [("a", 7, 7, (11, 12, 13, 14, 15, 16))] and len(a.block_ids) == 4
    verify(s, out, {"a": [30]})
    assert a.num_computed_tokens == 8 and a.token_ids[-2:] == [7, 30]
    assert len(a.block_ids) == 2 and s.kv.num_used_blocks == 2
    # Block 0 (1..4) and block 1 (5, 6, 7, 7) are full of real tokens with K/V: cached; nothing else is.
    assert a.num_indexed_blocks == 2 and s.kv.pool.num_cached == 2
    assert s.check_integrity() == []


def test_proposals_stop_short_of_max_tokens_and_the_context():
    s = make(Fixed([11, 12, 13]), max_model_len=12)
    a = prefill(s, "a", [1, 2, 3, 4, 5], max_tokens=3)   # 1 output so far; 2 more at most
    out = s.schedule()
    assert plan(out) == [("a", 5, 2, (11,))]           # one proposal + the target's token = max_tokens
    res = verify(s, out, {"a": [11, 8]})
    assert res[0].new_token_ids == [11, 8] and res[0].finish_reason is FinishReason.LENGTH
    assert s.kv.num_used_blocks == 0 and not s.running
    b = prefill(s, "b", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=20)   # 10 tokens of a 12-token context
    assert plan(s.schedule()) == [("b", 9, 2, (11,))]
    assert b.num_computed_tokens == 10


def test_a_stop_token_inside_the_accepted_run_ends_the_request_there():
    s = make(Fixed([11, EOS, 13]))
    prefill(s, "a", [1, 2, 3, 4, 5])
    out = s.schedule()
    res = verify(s, out, {"a": [11, EOS, 13, 14]})
    assert [(r.new_token_ids, r.finish_reason, r.last) for r in res] == [([11, EOS], FinishReason.STOP_TOKEN, True)]
    assert s.kv.num_used_blocks == 0 and s.check_integrity() == []


def test_groups_structured_output_and_no_proposal_decode_one_token():
    s = make(Fixed([]))
    prefill(s, "a", [1, 2, 3, 4, 5])
    assert plan(s.schedule()) == [("a", 5, 1, ())]                 # nothing proposed: a plain decode
    assert len(s.requests["a"].block_ids) == 2                     # the blocks taken for proposals went back
    s2 = make(Fixed([11, 12, 13]))
    s2.add_request("g", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, n=2, best_of=2))
    s2.add_request("j", [1, 2, 3, 4, 5], SamplingParams(
        temperature=0.0, structured_output=StructuredOutput("json_object")))
    s2.update(out := s2.schedule(), [7] * sum(x.samples for x in out.scheduled))
    assert all(not x.spec_token_ids for x in s2.schedule().scheduled)
    assert not s2.proposer.calls


def test_a_proposer_that_raises_for_one_request_costs_that_row_its_proposals_alone(caplog):
    prop = FailsFor([11, 12, 13], bad="b")
    s = make(prop)
    for i, rid in enumerate("abc"):
        s.add_request(rid, [1, 2, 3, 4, 20 + i], SamplingParams(temperature=0.0, max_tokens=5))
    s.update(s.schedule(), [7, 7, 7])
    with caplog.at_level(logging.ERROR, logger="tandem.engine.speculation"):
        out = s.schedule()
        # The batched call raised: each row was asked alone, and only b's raised. b decodes one token; the blocks
        # reserved for its proposals went back.
        assert prop.calls == [[("a", 3), ("b", 3), ("c", 3)], [("a", 3)], [("b", 3)], [("c", 3)]]
        assert plan(out) == [("a", 5, 4, (11, 12, 13)), ("b", 5, 1, ()), ("c", 5, 4, (11, 12, 13))]
        assert len(s.requests["b"].block_ids) == 2 and s.check_integrity() == []
        assert s.spec_stats.num_proposal_errors == 1 and s.spec_stats.num_drafts == 0
        res = verify(s, out, {"a": [11, 30], "c": [11, 12, 13, 31]})
        assert [(r.request_id, r.new_token_ids) for r in res] == [("a", [11, 30]), ("b", [0]), ("c", [11, 12, 13, 31])]
        while s.has_work:   # b raises on every step; each rejects every proposal
            out = s.schedule()
            verify(s, out, {x.request.request_id: [30] for x in out.scheduled if x.spec_token_ids})
    assert s.requests == {} and s.kv.num_used_blocks == 0 and s.check_integrity() == []
    assert s.spec_stats.num_proposal_errors == 3   # b's decodes after its first token: its 2nd, 3rd and 4th
    assert [r.getMessage() for r in caplog.records] == [
        "proposing tokens for request b raised; it decodes without speculation whenever it does (logged once per "
        "request)"]


def test_proposals_never_take_blocks_the_decodes_behind_need():
    s = make(Fixed([11, 12, 13]), num_blocks=4, block_size=4)
    s.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5))
    s.add_request("b", [1, 2, 3, 4, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=5))
    s.update(s.schedule(), [7, 7])
    a, b = s.requests["a"], s.requests["b"]            # 4 tokens in 1 block, 8 in 2; one block is free
    out = s.schedule()
    # a's proposals would take the free block, which b's decode may need: a decodes alone. b, the last, may.
    assert plan(out) == [("a", 3, 1, ()), ("b", 7, 4, (11, 12, 13))] and not out.preempted
    assert len(a.block_ids) == 1 and len(b.block_ids) == 3 and s.kv.num_free_blocks == 0


def test_blocks_and_budget_taken_for_proposals_not_made_go_back_before_anyone_joins():
    s = make(Fixed([]), num_blocks=4, block_size=4, budget=13)
    a = prefill(s, "a", [1, 2, 3], max_tokens=5)        # 4 tokens in 1 block; 3 blocks free
    s.add_request("b", list(range(1, 13)), SamplingParams(temperature=0.0, max_tokens=4))   # 12 tokens, 3 blocks
    out = s.schedule()
    assert plan(out) == [("a", 3, 1, ()), ("b", 0, 12, ())] and not out.preempted
    assert len(a.block_ids) == 1 and s.kv.num_free_blocks == 0


def test_300_random_operations_keep_the_kv_invariants_and_free_every_block():
    rng = random.Random(7)

    class Random:
        def propose(self, rows):
            return [[rng.randrange(3, 40) for _ in range(rng.randrange(0, k + 1))] for _, k in rows]

    s = make(Random(), k=4, num_blocks=14, block_size=4, max_model_len=40, budget=24, seqs=5)
    rid = 0
    for op in range(300):
        action = rng.random()
        if action < 0.25:
            prompt = [rng.randrange(3, 12) for _ in range(rng.randrange(1, 14))]   # small ids: prefix hits
            s.add_request(f"r{rid}", prompt, SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30)))
            rid += 1
        elif action < 0.32 and s.requests:
            s.abort(rng.choice(sorted(s.requests)))
        else:
            out = s.schedule()
            sampled, runs = [], {}
            for x in out.scheduled:
                if not x.samples:
                    continue
                if x.spec_token_ids:   # accept a random prefix, then the target's own token
                    a = rng.randrange(0, len(x.spec_token_ids) + 1)
                    tokens = list(x.spec_token_ids[:a]) + [EOS if rng.random() < 0.05 else rng.randrange(3, 40)]
                    runs[x.request.request_id] = (tokens, None)
                    sampled.append(tokens[0])
                else:
                    sampled.append(EOS if rng.random() < 0.05 else rng.randrange(3, 40))
            s.update(out, sampled, runs=runs)
        assert s.check_integrity() == [], f"after operation {op}"
        for r in s.running:   # every token with K/V counted is a real token; tables hold exactly those
            assert len(r.block_ids) == s.kv.blocks_for_tokens(r.num_computed_tokens)
    assert s.num_preemptions > 0 and s.spec_stats.num_accepted_tokens > 0
    assert s.spec_stats.num_accepted_tokens < s.spec_stats.num_draft_tokens
    for r in list(s.requests):
        s.abort(r)
    assert s.kv.num_used_blocks == 0 and s.check_integrity() == []


def test_bad_speculative_options_get_one_precise_error():
    cfg = config_from_args(["--model", "m", "--speculative-method", "ngram", "--num-speculative-tokens", "3",
                            "--ngram-min", "2", "--ngram-max", "5"])
    assert (cfg.speculative_method, cfg.num_speculative_tokens, cfg.ngram_min, cfg.ngram_max) == ("ngram", 3, 2, 5)
    for kw, message in (
            (dict(speculative_method="draft"), "draft needs draft_model"),
            (dict(draft_model="d"), "draft needs draft_model"),
            (dict(speculative_method="medusa"), "speculative_method must be one of"),
            (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens must be in"),
            (dict(speculative_method="ngram", ngram_min=3, ngram_max=2), "ngram_min <= ngram_max"),
            (dict(speculative_method="ngram", tensor_parallel_size=2), "not supported with tensor or pipeline")):
        with pytest.raises(ValueError, match=message):
            EngineConfig(model="m", **kw)
