"""Device sampler: top-k/top-p masks against transformers' logits warpers, greedy rows, seeds, distribution."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine_svc.core.request import SamplingParams
from engine_svc.sampling.sampler import SamplingBatch, apply_top_k_top_p, exponential_noise, sample

V = 50


def batch(params, outs=None):
    return SamplingBatch.build(params, outs or [0] * len(params), V, torch.device("cpu"))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (1, 1.0), (0, 0.05)])
def test_masks_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    ours = apply_top_k_top_p(logits.clone(), batch([SamplingParams(top_k=top_k, top_p=top_p)] * 4))
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_rows_use_their_own_parameters():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.0),
              SamplingParams(temperature=1.0, top_p=1e-6)]
    ids = sample(logits, batch(params))
    assert ids.tolist() == logits.argmax(-1).tolist()   # greedy, top-1, and a nucleus of one token


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[2:3], batch([seeded], [n])).item() for n in range(20)]
    other = SamplingParams(temperature=1.0)
    mixed = [sample(logits, batch([other, other, seeded, other], [0, 0, n, 0]))[2].item() for n in range(20)]
    assert alone == mixed
    assert len(set(alone)) > 1   # different output indices draw different noise


def test_sampling_follows_the_distribution():
    # Chi-square goodness of fit on a 6-token vocabulary: 6000 draws, 5 degrees of freedom, p=0.001 bound 20.5.
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().expand(6000, -1).contiguous()
    b = SamplingBatch.build([SamplingParams(temperature=1.0)] * 6000, [0] * 6000, 6, torch.device("cpu"))
    torch.manual_seed(3)
    counts = torch.bincount(sample(logits, b), minlength=6).double()
    expected = probs.double() * 6000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (counts, chi2)


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(4000, -1).contiguous()
    def share_of_top(t):
        b = SamplingBatch.build([SamplingParams(temperature=t)] * 4000, [0] * 4000, 3, torch.device("cpu"))
        return (sample(logits, b) == 0).double().mean().item()
    torch.manual_seed(0)
    hot, cold = share_of_top(2.0), share_of_top(0.25)
    p_cold = 1 / (1 + math.exp(-4) + math.exp(-8))
    assert cold == pytest.approx(p_cold, abs=0.02) and hot < 0.6


def test_processors_apply_to_greedy_rows_per_request():
    logits = torch.zeros(4, V)
    logits[:, 0] = 5.0                                      # token 0 would win everywhere
    params = [SamplingParams(temperature=0.0, logit_bias=((7, 10.0),)),
              SamplingParams(temperature=0.0, allowed_token_ids=frozenset({3, 4})),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=frozenset({0})),
              SamplingParams(temperature=0.0, repetition_penalty=100.0)]
    b = SamplingBatch.build(params, [0, 0, 1, 3], V, torch.device("cpu"),
                            histories=[([], []), ([], []), ([], []), ([0], [0])])
    logits[1, 4] = 1.0
    logits[3, 9] = 0.5
    # row 2: token 0 is a stop id before min_tokens; row 3: 0 was seen, so 5 / 100 loses to an unseen 0.5
    assert sample(logits, b).tolist() == [7, 4, 1, 9]


def test_min_tokens_lifts_after_enough_outputs_and_respects_ignore_eos():
    logits = torch.zeros(3, V)
    logits[:, 2] = 5.0                                      # 2 plays EOS
    params = [SamplingParams(temperature=0.0, min_tokens=2)] * 2 + [SamplingParams(temperature=0.0, min_tokens=2,
                                                                                   ignore_eos=True)]
    b = SamplingBatch.build(params, [1, 2, 0], V, torch.device("cpu"), eos_token_ids=frozenset({2}))
    assert sample(logits, b).tolist() == [0, 2, 2]


def test_min_p_never_samples_below_the_threshold():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.19, 0.11] + [1e-9] * (V - 4)]))
    b = SamplingBatch.build([SamplingParams(temperature=1.0, min_p=0.5)] * 3000, [0] * 3000, V, torch.device("cpu"))
    ids = sample(logits.expand(3000, V).contiguous(), b)
    counts = torch.bincount(ids, minlength=V)
    assert counts[2:].sum() == 0                            # 0.19 < 0.5 * 0.4
    assert abs(counts[0].item() / 3000 - 0.4 / 0.7) < 0.05  # renormalised over the survivors


def test_penalties_need_the_histories():
    with pytest.raises(ValueError, match="prompt and output ids"):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)], [0], V, torch.device("cpu"))


def test_seeded_rows_follow_the_distribution_under_top_k():
    # One seeded row per draw (seeds 0..5999): the hashed noise across seeds must still sample p, renormalised
    # over the top-k candidates (chi-square, 3 degrees of freedom, p=0.001 bound 16.3).
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().expand(6000, -1).contiguous()
    b = SamplingBatch.build([SamplingParams(temperature=1.0, top_k=4, seed=i) for i in range(6000)], [0] * 6000, 6,
                            torch.device("cpu"))
    counts = torch.bincount(sample(logits, b), minlength=6).double()
    assert counts[4:].sum() == 0
    expected = probs[:4].double() / probs[:4].sum() * 6000
    chi2 = ((counts[:4] - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3, (counts, chi2)


def test_candidate_narrowing_changes_no_seeded_draw():
    # The noise is keyed by token id, so drawing it only for a top-k's candidates (the partial top-k path) picks
    # what the full-vocabulary path picks when the other tokens have no probability anyway.
    logits = torch.full((200, V), float("-inf"))
    logits[:, :5] = torch.randn(200, 5)
    full = SamplingBatch.build([SamplingParams(temperature=1.0, seed=i) for i in range(200)], [3] * 200, V,
                               torch.device("cpu"))
    narrow = SamplingBatch.build([SamplingParams(temperature=1.0, seed=i, top_k=5) for i in range(200)], [3] * 200,
                                 V, torch.device("cpu"))
    assert narrow.top_k_width == 5
    a, b = sample(logits, full), sample(logits, narrow)
    assert torch.equal(a, b) and len(set(a.tolist())) == 5


def test_a_forbidden_token_is_never_drawn_even_in_the_hashs_top_bucket():
    """Row key 27206443 hashes token 0 into the top bucket, where float32 rounds the uniform to 1: its noise must
    stay > 0, or a masked token 0 would score 0 / 0 = NaN and win the argmax."""
    key = torch.tensor([27206443])
    assert exponential_noise(key, torch.tensor([0])).item() > 0
    b = batch([SamplingParams(temperature=1.0)])
    b.row_keys = key
    logits = torch.zeros(1, V)
    logits[0, 0] = float("-inf")       # masked, e.g. by a grammar
    assert sample(logits, b).item() != 0
    b.top_k, b.needs_top_k, b.top_k_width = torch.tensor([5]), True, 5
    logits = torch.arange(V, dtype=torch.float32)[None, :].flip(-1)   # token 0 is the best: kept by top-k
    logits[0, 0] = float("-inf")
    assert sample(logits, b).item() in range(1, 6)


def host_allowed_mask(allowed_ids: list, vocab: int) -> torch.Tensor:
    """The mask as it was built before: a [N, V] host tensor filled row by row, then copied."""
    mask = torch.ones(len(allowed_ids), vocab, dtype=torch.bool)
    for i, ids in enumerate(allowed_ids):
        if ids is not None:
            mask[i] = False
            mask[i, list(ids)] = True
    return mask


def test_the_allowed_mask_made_on_the_device_equals_the_host_built_one():
    rng = random.Random(4)
    for n in (1, 3, 9):
        allowed = [None if rng.random() < 0.3 else frozenset(rng.sample(range(V), rng.randint(1, 12)))
                   for _ in range(n)]
        allowed[0] = allowed[0] or frozenset({V - 1})
        built = SamplingBatch.build([SamplingParams(allowed_token_ids=a) for a in allowed], [0] * n, V,
                                    torch.device("cpu"))
        assert torch.equal(built.allowed, host_allowed_mask(allowed, V))
    assert batch([SamplingParams()] * 2).allowed is None
