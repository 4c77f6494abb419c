"""The engine's Falcon against Hugging Face transformers on tiny random checkpoints (fp32, CPU), one per attention
layout: multi-query + parallel attention (Falcon-7B), the new decoder architecture with 2 K/V groups (Falcon-40B)
and with one shared norm (Falcon2-11B), and multi-head + sequential attention with biases. Prefill and paged-decode logits (block size 4, so decodes cross
block boundaries) and greedy continuations must match."""
from __future__ import annotations

import json

import pytest
import torch

from engine_svc.core.request import SamplingParams
from engine_svc.model_config import ModelConfig
from tests.engine.family_checks import PROMPTS, assert_greedy_matches, assert_logits_match, hf_model, make_engine

VARIANTS = {
    "7b-multi-query-parallel": dict(multi_query=True, parallel_attn=True),
    "40b-new-decoder-2kv": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mha-sequential-bias": dict(multi_query=False, parallel_attn=False, bias=True),
    # Falcon2-11B style: the new decoder architecture with a single input_layernorm feeding attention and MLP.
    "11b-new-decoder-one-norm": dict(new_decoder_architecture=True, num_kv_heads=4, num_ln_in_parallel_attn=1),
}
KV_HEADS = {"7b-multi-query-parallel": 1, "40b-new-decoder-2kv": 2, "mha-sequential-bias": 4,
            "11b-new-decoder-one-norm": 4}


def write_tiny_falcon(path, *, seed: int = 0, **overrides):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2)
    cfg = FalconConfig(**{**kw, **overrides})
    model = FalconForCausalLM(cfg)
    with torch.no_grad():  # HF's init is tiny (and zero biases, unit norms); redraw everything so all of it matters
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif name.endswith("layernorm.weight") or ".ln_" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = write_tiny_falcon(tmp_path_factory.mktemp(request.param), seed=11, **VARIANTS[request.param])
    return request.param, path


def test_config_reads_falcon_kv_heads(checkpoint):
    variant, path = checkpoint
    cfg = ModelConfig.from_hf_dir(path)
    assert cfg.architecture == "FalconForCausalLM"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, KV_HEADS[variant], 16)
    assert cfg.intermediate_size == 256 and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings


def test_prefill_and_paged_decode_logits_match(checkpoint):
    _, path = checkpoint
    assert_logits_match(make_engine(path), hf_model(path))


def test_greedy_continuations_identical(checkpoint):
    _, path = checkpoint
    outs = assert_greedy_matches(make_engine(path), hf_model(path))
    assert len(set(map(tuple, outs))) == len(PROMPTS)   # discriminative logits: the prompts lead different ways


def test_untied_lm_head(tmp_path):
    """tie_word_embeddings=False: lm_head is its own checkpoint tensor."""
    path = write_tiny_falcon(tmp_path, seed=3, tie_word_embeddings=False)
    ref = hf_model(path)
    outs = make_engine(path).generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    with torch.no_grad():
        gen = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert outs[0] == gen[0, len(PROMPTS[0]):].tolist()


def test_alibi_is_refused_at_load(tmp_path):
    path = tmp_path / "alibi"
    path.mkdir()
    cfg = dict(architectures=["FalconForCausalLM"], model_type="falcon", vocab_size=320, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=True, parallel_attn=True,
               layer_norm_epsilon=1e-5)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"ALiBi \(alibi=True\) is not supported"):
        make_engine(path, load_format="dummy")
