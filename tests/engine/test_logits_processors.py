"""Batched logits processors against Hugging Face transformers' processors (same inputs, same outputs) and, where
HF has none (OpenAI presence/frequency penalties), against a per-row reference written from the definition."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

from engine_svc.sampling.logits_processors import (apply_logit_bias, apply_min_p, apply_penalties, keep_only, suppress,
                                                   token_counts)

V = 50


def padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    prompts = [[1, 2, 3, 3], [7], [10, 11, 12, 13, 14, 15], [40]]
    outputs = [[3, 4, 4, 4], [], [12, 20], [41, 41, 41, 41, 41]]
    return logits, prompts, outputs


def test_token_counts_ignore_padding():
    counts = token_counts(padded([[1, 1, 3], [], [0]]), 5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0] * 5, [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_repetition_penalty_matches_transformers(batch, penalty):
    logits, prompts, outputs = batch
    n = len(prompts)
    ones, zeros = torch.full((n,), penalty), torch.zeros(n)
    ours = apply_penalties(logits, padded(prompts), padded(outputs), ones, zeros, zeros)
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(n):   # HF penalizes every id of input_ids: the prompt followed by the output
        ids = torch.tensor([prompts[i] + outputs[i]])
        assert torch.allclose(ours[i], proc(ids, logits[i:i + 1].clone())[0])


def test_presence_and_frequency_follow_the_openai_definition(batch):
    logits, prompts, outputs = batch
    presence = torch.tensor([0.5, 1.0, 0.0, -0.5])
    frequency = torch.tensor([0.25, 0.0, 1.5, 0.1])
    ours = apply_penalties(logits, padded(prompts), padded(outputs), torch.ones(4), presence, frequency)
    expected = logits.clone()
    for i, out in enumerate(outputs):
        for t in set(out):   # output tokens only; the prompt is not counted
            expected[i, t] -= presence[i] + frequency[i] * out.count(t)
    assert torch.allclose(ours, expected)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_matches_transformers(batch, min_p):
    logits = batch[0]
    ours = apply_min_p(logits, torch.full((4,), min_p))
    ref = MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_min_p_per_row_and_off():
    logits = torch.tensor([[2.0, 1.0, -3.0], [2.0, 1.0, -3.0]])
    out = apply_min_p(logits, torch.tensor([0.0, 0.5]))
    assert torch.equal(out[0], logits[0])
    assert out[1].tolist() == [2.0, float("-inf"), float("-inf")]   # p1/p0 = e^-1 < 0.5


def test_logit_bias_matches_transformers_sequence_bias(batch):
    logits = batch[0]
    bias = {5: 3.0, 9: -100.0, 17: 0.5}
    rows = torch.tensor([2, 2, 2])
    ours = apply_logit_bias(logits, rows, torch.tensor(list(bias)), torch.tensor(list(bias.values())))
    proc = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})
    ref = proc(torch.tensor([[1, 2, 3]]), logits[2:3].clone())[0]
    assert torch.allclose(ours[2], ref)
    assert torch.equal(ours[[0, 1, 3]], logits[[0, 1, 3]])


def test_allowed_tokens_and_suppression():
    logits = torch.zeros(2, 6)
    allowed = torch.ones(2, 6, dtype=torch.bool)
    allowed[0] = torch.tensor([False, True, False, True, False, False])
    kept = keep_only(logits, allowed)
    assert torch.isinf(kept[0]).tolist() == [True, False, True, False, True, True]
    assert not torch.isinf(kept[1]).any()
    out = suppress(logits, torch.tensor([1, 1]), torch.tensor([2, 5]))
    assert torch.isinf(out[1]).tolist() == [False, False, True, False, False, True] and not torch.isinf(out[0]).any()


def test_min_tokens_suppression_matches_transformers():
    logits = torch.randn(1, V)
    eos = [2, 7]
    proc = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=2, eos_token_id=eos)
    ref = proc(torch.tensor([[5, 6, 8, 9]]), logits.clone())   # one new token so far: EOS still forbidden
    ours = suppress(logits, torch.tensor([0, 0]), torch.tensor(eos))
    assert torch.equal(ours, ref)
