"""The engine's Llama against Hugging Face transformers on the same tiny random checkpoint (fp32, CPU): logits of a
prefill and of decode steps through the paged cache (crossing block boundaries), and greedy continuations."""
from __future__ import annotations

import pytest
import torch

from engine_svc.core.request import SamplingParams
from tests.engine.family_checks import PROMPTS, assert_greedy_matches, assert_logits_match, hf_model, make_engine
from tests.engine.tiny_models import write_tiny_llama

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
VARIANTS = {
    "plain": dict(),
    "tied": dict(tie=True),
    "llama3-rope": dict(rope_scaling=LLAMA3_SCALING),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp(request.param), seed=7, **VARIANTS[request.param])


def test_prefill_and_paged_decode_logits_match(checkpoint):
    # 12 decode steps: every sequence crosses at least two 4-token block boundaries through the cache.
    assert_logits_match(make_engine(checkpoint), hf_model(checkpoint), steps=12)


def test_greedy_continuations_identical(checkpoint):
    assert_greedy_matches(make_engine(checkpoint), hf_model(checkpoint), n=20)


def test_greedy_with_repetition_penalty_bias_and_min_tokens_matches_transformers(checkpoint):
    """The engine's processors inside real generation equal transformers' generate with the same settings."""
    bias = {5: 1.5, 17: -2.0}
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, repetition_penalty=1.4,
                            logit_bias=tuple(bias.items()))
    ours = make_engine(checkpoint).generate(PROMPTS, params)
    hf = hf_model(checkpoint)
    for prompt, out in zip(PROMPTS, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          repetition_penalty=1.4, sequence_bias={(t,): v for t, v in bias.items()},
                          pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()
