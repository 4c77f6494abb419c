"""Mistral (the Llama layers with a sliding window) against Hugging Face transformers on tiny random checkpoints
(fp32, CPU), without a window and with a 5-token window shorter than the prompts: prefill and paged-decode logits,
greedy continuations, and the Triton backend (under the interpreter on the CPU) against the torch backend."""
from __future__ import annotations

import json

import pytest
import torch

from engine_svc.models import MODEL_REGISTRY
from engine_svc.models.mistral import MistralForCausalLM
from tests.engine.tiny_models import save_redrawn
from tests.engine.family_checks import (PROMPTS, assert_greedy_matches, assert_logits_match, make_engine,
                                        assert_triton_greedy_equals_torch, triton_unavailable)

TRITON_SKIP = triton_unavailable()
WINDOW = 5
VARIANTS = {"no-window": None, "window5": WINDOW}


def write_tiny_mistral(path, *, sliding_window: int | None, seed: int = 0):
    from transformers import MistralConfig
    from transformers import MistralForCausalLM as HFMistral

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=sliding_window, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return save_redrawn(HFMistral(cfg).float(), path)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return write_tiny_mistral(tmp_path_factory.mktemp(request.param), sliding_window=VARIANTS[request.param],
                              seed=11)


def hf_model(path, **kw):
    from tests.engine import family_checks
    # eager attention: the plain masked softmax, which applies the sliding window in every forward.
    return family_checks.hf_model(path, attn_implementation="eager", **kw)


def test_registered_and_reads_the_window(checkpoint):
    engine = make_engine(checkpoint)
    assert MODEL_REGISTRY["MistralForCausalLM"] is MistralForCausalLM
    assert isinstance(engine.runner.model, MistralForCausalLM)
    expected = json.loads((checkpoint / "config.json").read_text()).get("sliding_window")
    assert expected in VARIANTS.values()
    windows = {layer.self_attn.sliding_window for layer in engine.runner.model.model.layers}
    assert windows == {expected}


def test_transformers_applies_the_window(checkpoint):
    """The reference really is windowed: with the window lifted the same weights give other late logits."""
    windowed = hf_model(checkpoint)
    if windowed.config.sliding_window is None:
        pytest.skip("no window in this variant")
    full = hf_model(checkpoint, sliding_window=None)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = windowed(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(a[:WINDOW], b[:WINDOW])              # positions < window see their whole prefix
    assert (a[WINDOW:] - b[WINDOW:]).abs().amax(-1).min() > 1e-3    # later ones do not


def test_prefill_and_paged_decode_logits_match(checkpoint):
    assert_logits_match(make_engine(checkpoint), hf_model(checkpoint))


def test_greedy_continuations_identical(checkpoint):
    assert_greedy_matches(make_engine(checkpoint), hf_model(checkpoint))


@pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton unavailable: {TRITON_SKIP}")
def test_triton_backend_greedy_equals_torch_with_window(tmp_path):
    path = write_tiny_mistral(tmp_path / "window5", sliding_window=WINDOW, seed=11)
    # A 6-token step budget: the 11-token prompt is prefilled in two chunks, the second over a cached prefix.
    assert_triton_greedy_equals_torch(path, [PROMPTS[0], PROMPTS[2][:7]], 6, max_num_batched_tokens=6)
