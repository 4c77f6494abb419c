"""SmolLM2-135M (the default GGUF) with speculative decoding: greedy tokens equal those without, for n-gram lookup
and for SmolLM2 drafting for itself (which then accepts nearly everything), on a prompt whose answer quotes it."""
from __future__ import annotations

import pytest

from benchmarks.spec_workload import quote_prompt
from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    return Engine(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", num_kv_blocks=24,
                               max_model_len=384, enable_prefix_caching=False))


def test_smollm2_greedy_tokens_equal_those_without_speculation(engine, smollm2_gguf):
    prompt = quote_prompt(str(smollm2_gguf), 32, 0, engine.model_cfg.vocab_size, "auto")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = engine.with_scheduling().generate([prompt], params)
    ngram = engine.with_scheduling(speculative_method="ngram", num_speculative_tokens=4)
    assert ngram.generate([prompt], params) == plain
    assert ngram.spec_stats.acceptance_rate > 0.3   # the answer repeats the passage
    draft = engine.with_scheduling(speculative_method="draft", draft_model=str(smollm2_gguf),
                                   num_speculative_tokens=4)
    assert draft.generate([prompt], params) == plain
    assert draft.spec_stats.acceptance_rate > 0.9
    assert ngram.kv.num_used_blocks == draft.kv.num_used_blocks == 0
