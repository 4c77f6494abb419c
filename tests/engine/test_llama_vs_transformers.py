"""The engine's Llama against Hugging Face transformers on the same tiny random checkpoint (fp32, CPU): logits of a
prefill and of decode steps through the paged cache (crossing block boundaries), and greedy continuations."""
from __future__ import annotations

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
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


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def make_engine(path, **kw) -> Engine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


def test_prefill_and_paged_decode_logits_match(checkpoint):
    ref = hf_model(checkpoint)
    engine = make_engine(checkpoint)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, greedy)
    seqs = {f"r{i}": list(p) for i, p in enumerate(PROMPTS)}
    steps = 0
    while engine.has_work():
        out = engine.scheduler.schedule()
        logits = engine.runner.forward_logits(out)
        sampling = [s for s in out.scheduled if s.samples]
        with torch.no_grad():
            for row, s in enumerate(sampling):
                ids = torch.tensor([seqs[s.request.request_id]])
                expected = ref(ids).logits[0, -1].float()
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        sampled = logits.argmax(-1).tolist()
        for s, tok in zip(sampling, sampled):
            seqs[s.request.request_id].append(tok)
        engine.scheduler.update(out, sampled)
        steps += 1
    assert steps == 12
    # Every sequence decoded 12 tokens, crossing at least two 4-token block boundaries through the cache.
    assert [len(s) for s in seqs.values()] == [len(p) + 12 for p in PROMPTS]
    assert engine.kv.num_used_blocks == 0


def test_greedy_continuations_identical(checkpoint):
    ref = hf_model(checkpoint)
    engine = make_engine(checkpoint)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert out == gen[0, len(prompt):].tolist()


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
