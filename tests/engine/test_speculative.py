"""Speculative decoding on tiny random Llamas (tests/engine/tiny_models.py): greedy outputs with n-gram and draft
proposals are identical to those without (tokens, logprobs, finish reasons), in mixed batches (a group and a
penalized request beside verify rows), with asynchronous scheduling, preemption, stop ids, max_tokens inside an
accepted run and LoRA; a draft model equal to the target accepts everything; the rejection rule reproduces the
target distribution (chi-square over many seeds, small vocabulary), alone and through the engine; a proposer that
raises for one request costs that request its proposals alone; and no block is used at the end."""
from __future__ import annotations

import logging

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.service.engine_loop import EngineLoop
from engine_svc.service.proto_convert import load_to_pb
from engine_svc.spec.rejection_sampler import rejection_sample
from tests.engine.lora_files import write_lora_adapter
from tests.engine.tiny_models import write_tiny_llama

REPEAT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]   # n-gram lookup proposes from the first lines


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return write_tiny_llama(root / "target"), write_tiny_llama(root / "draft", seed=1)


@pytest.fixture(scope="module")
def base(models):
    return Engine(EngineConfig(model=str(models[0]), device="cpu", num_kv_blocks=160, block_size=4, max_num_seqs=6,
                               enable_lora=True, max_loras=1, max_lora_rank=8))


def run(engine, requests):
    """requests: (prompt, params[, adapter]) -> per request: (tokens, logprobs, finish reasons), each output's in
    turn (a group's outputs interleave differently with the scheduling mode). Each run takes a fresh engine
    (base.with_scheduling): engines over one runner share its KV tensors, so an engine's prefix cache is stale once
    another has run."""
    out = {f"q{i}": {} for i in range(len(requests))}
    for i, (prompt, params, *adapter) in enumerate(requests):
        engine.add_request(f"q{i}", prompt, params, adapter=adapter[0] if adapter else None)
    while engine.has_work():
        for o in engine.step():
            toks, lps, reasons = out[o.request_id].setdefault(o.index, ([], [], []))
            toks.extend(o.new_token_ids)
            lps.extend((lp.token_id, round(lp.logprob, 4), tuple(t for t, _ in lp.top)) for lp in o.logprobs or ())
            if o.finish_reason is not None:   # how many outputs carry the tokens differs; the endings do not
                reasons.append((o.index, o.finish_reason))
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    return [tuple(sum((by_index[k][part] for k in sorted(by_index)), []) for part in range(3))
            for by_index in (out[f"q{i}"] for i in range(len(requests)))]


def mixed_requests():
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        (REPEAT, SamplingParams(max_tokens=30, **greedy)),
        (REPEAT[2:], SamplingParams(max_tokens=17, logprobs=2, **greedy)),         # logprobs of accepted tokens
        ([20, 21, 22, 20, 21, 22, 20], SamplingParams(max_tokens=25, **greedy)),
        (REPEAT, SamplingParams(max_tokens=12, n=2, best_of=2, **greedy)),          # a group: no speculation
        (REPEAT[1:], SamplingParams(max_tokens=15, repetition_penalty=1.3, **greedy)),
    ]


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_outputs_equal_those_without_speculation(base, models, method, async_scheduling):
    plain = run(base.with_scheduling(async_scheduling=async_scheduling), mixed_requests())
    spec = base.with_scheduling(async_scheduling=async_scheduling, speculative_method=method,
                                num_speculative_tokens=3, draft_model=str(models[1]) if method == "draft" else None)
    assert run(spec, mixed_requests()) == plain
    assert spec.spec_stats.num_drafts > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_proposer_that_raises_for_one_request_leaves_every_output_exact(base, models, method, monkeypatch, caplog):
    """Proposing for q0 raises on every step, after the proposer has done its work for the whole batch: q0 decodes
    without proposals, the others still verify theirs, and every output equals the one without speculation."""
    plain = run(base.with_scheduling(), mixed_requests())
    spec = base.with_scheduling(speculative_method=method, num_speculative_tokens=3,
                                draft_model=str(models[1]) if method == "draft" else None)
    proposer = spec.scheduler.proposer.proposer   # inside the engine's timing wrapper
    real = proposer.propose

    def propose(rows):
        proposals = real(rows)
        if any(r.external_id == "q0" for r, _ in rows):
            raise RuntimeError("planted in q0's proposals")
        return proposals

    monkeypatch.setattr(proposer, "propose", propose)
    with caplog.at_level(logging.ERROR, logger="tandem.engine.speculation"):
        assert run(spec, mixed_requests()) == plain   # run() checks the KV invariants and 0 blocks used at the end
    assert spec.spec_stats.num_drafts > 0 and spec.spec_stats.num_proposal_errors > 1
    load = load_to_pb(EngineLoop(spec).load)   # GetLoad's answer, which the gateway's metrics read
    assert load.spec_decode_num_proposal_errors == spec.spec_stats.num_proposal_errors
    assert len(caplog.records) == 1 and "request q0 raised" in caplog.records[0].getMessage()


def test_stop_ids_and_max_tokens_inside_an_accepted_run(base, models):
    """A draft equal to the target accepts every proposal, so stops and max_tokens land inside accepted runs."""
    greedy = dict(temperature=0.0)
    reference = run(base.with_scheduling(), [(REPEAT, SamplingParams(max_tokens=30, ignore_eos=True,
                                                                       **greedy))])[0][0]
    stop = reference[9]
    requests = [(REPEAT, SamplingParams(max_tokens=30, stop_token_ids=frozenset({stop}), **greedy)),
                (REPEAT, SamplingParams(max_tokens=6, ignore_eos=True, **greedy)),
                (REPEAT, SamplingParams(max_tokens=11, ignore_eos=True, logprobs=1, **greedy))]
    spec = base.with_scheduling(speculative_method="draft", draft_model=str(models[0]), num_speculative_tokens=4)
    got = run(spec, requests)
    assert got == run(base.with_scheduling(), requests)
    assert got[0][0] == reference[:reference.index(stop) + 1] and len(got[1][0]) == 6 and len(got[2][0]) == 11
    assert spec.spec_stats.acceptance_rate == 1.0
    load = load_to_pb(EngineLoop(spec).load)   # GetLoad's answer
    assert load.spec_decode_acceptance_rate == 1.0 and load.spec_decode_num_drafts == spec.spec_stats.num_drafts
    assert load.spec_decode_mean_accepted_length == spec.spec_stats.mean_accepted_length > 2
    assert 0 < load.spec_decode_draft_time_share < 1
    assert list(load.spec_decode_num_accepted_tokens_per_pos) == spec.spec_stats.accepted_per_pos


def test_preemption_keeps_outputs_exact_and_the_draft_cache_in_step(base, models):
    requests = [(REPEAT[i:] + [30 + i], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
                for i in range(4)]
    small = dict(num_kv_blocks=16, max_num_seqs=4)
    plain = run(base.with_scheduling(**small), requests)
    spec = base.with_scheduling(speculative_method="draft", draft_model=str(models[0]), num_speculative_tokens=3,
                                **small)
    assert run(spec, requests) == plain
    assert spec.scheduler.num_preemptions > 0
    assert spec.spec_stats.acceptance_rate == 1.0   # the draft recomputed what preemption dropped
    ngram = base.with_scheduling(speculative_method="ngram", num_speculative_tokens=3, **small)
    assert run(ngram, requests) == plain and ngram.scheduler.num_preemptions > 0


def test_lora_requests_verify_with_their_adapter(base, models, tmp_path):
    base.load_adapter("ad", str(write_lora_adapter(models[0], tmp_path / "ad", r=4, alpha=8, seed=3)))
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    requests = [(REPEAT, greedy, "ad"), (REPEAT, greedy)]
    plain = run(base.with_scheduling(), requests)
    assert plain[0][0] != plain[1][0]
    spec = base.with_scheduling(speculative_method="ngram", num_speculative_tokens=3)
    assert run(spec, requests) == plain


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square (categories with expected count >= 5)."""
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize("proposer", ["point_mass", "draft"])
def test_rejection_sampling_gives_the_target_distribution(proposer):
    """Two positions over 6 tokens: the first emitted token follows p_1 and the second (given the first was an
    accepted proposal) p_2, for N independent row keys."""
    n, vocab = 20000, 6
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(2, vocab, generator=gen).pow(2)
    p = (p / p.sum(-1, keepdim=True))
    q1 = torch.rand(vocab, generator=gen)
    q1 = q1 / q1.sum()
    if proposer == "draft":   # proposals drawn from q, passed with it
        proposals = torch.multinomial(q1, n, replacement=True, generator=gen)[:, None]
        q = q1.expand(n, 1, vocab)
    else:                     # n-gram: always the same token, a point mass
        proposals = torch.full((n, 1), 2, dtype=torch.int64)
        q = None
    keys = torch.randint(0, 1 << 32, (n, 2), generator=gen)
    num_accepted, final = rejection_sample(p.expand(n, 2, vocab), proposals, torch.ones(n, dtype=torch.int64), q,
                                           keys)
    first = torch.where(num_accepted == 1, proposals[:, 0], final)
    assert chi_square_p(torch.bincount(first, minlength=vocab).double(), p[0].double() * n) > 1e-3
    second = final[num_accepted == 1]
    assert chi_square_p(torch.bincount(second, minlength=vocab).double(), p[1].double() * len(second)) > 1e-3


def test_greedy_rows_accept_the_argmax_prefix():
    p = torch.nn.functional.one_hot(torch.tensor([[3, 1, 4, 0]]), 5).float()
    num_accepted, final = rejection_sample(p, torch.tensor([[3, 1, 2]]), torch.tensor([3]), None, None)
    assert num_accepted.tolist() == [2] and final.tolist() == [4]
    num_accepted, final = rejection_sample(p, torch.tensor([[3, 1, 4]]), torch.tensor([3]), None, None)
    assert num_accepted.tolist() == [3] and final.tolist() == [0]


def test_seeded_sampling_through_the_engine_follows_the_target_distribution(base, models):
    """The token distribution at each output position, over many seeds, with n-gram and draft proposals and
    without (a two-sample chi-square per position): a small vocabulary through allowed_token_ids."""
    allowed = frozenset({5, 6, 7, 8})
    prompt = [5, 6, 7, 8] * 3

    def draw(engine, seeds):
        requests = [(prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=4, ignore_eos=True,
                                            allowed_token_ids=allowed)) for s in seeds]
        return torch.tensor([r[0] for r in run(engine, requests)])

    plain = draw(base.with_scheduling(max_num_seqs=64), range(240))
    for offset, method in ((1000, "ngram"), (2000, "draft")):
        spec_engine = base.with_scheduling(max_num_seqs=64, speculative_method=method, num_speculative_tokens=3,
                                           draft_model=str(models[1]) if method == "draft" else None)
        spec = draw(spec_engine, range(offset, offset + 240))
        assert spec_engine.spec_stats.num_accepted_tokens > 80
        for pos in range(4):
            a = torch.bincount(plain[:, pos], minlength=9)[5:].double()
            b = torch.bincount(spec[:, pos], minlength=9)[5:].double()
            total = a + b
            expected_a, expected_b = total * a.sum() / total.sum(), total * b.sum() / total.sum()
            stat = ((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b)[total > 0].sum()
            p_value = float(torch.special.gammaincc(torch.tensor(1.5, dtype=torch.float64), stat.double() / 2))
            assert p_value > 1e-3, (method, pos, a.tolist(), b.tolist())
