"""SmolLM2-135M (the default GGUF) on the CPU default path, the batch-1 GEMVs over its Q4_1 / Q8_0 blocks: each
prompt decoded alone (every step a single-token step) gives the float32 path's greedy tokens, which the e2e tests
pin to transformers'; prompts decoded together (F.linear) too."""
from __future__ import annotations

import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.quant.gemv_linear import GemvLinear

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "日本の首都は"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _engine(path, dtype: str) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", dtype=dtype, num_kv_blocks=48, max_model_len=256,
                               enable_prefix_caching=False))


@pytest.fixture(scope="module")
def prompts(smollm2_gguf):
    from tokenizer_svc.loading import load_tokenizer
    tok = load_tokenizer(str(smollm2_gguf))
    return [tok.encode_text(p) for p in PROMPTS]


def test_default_path_generates_the_float32_paths_tokens(smollm2_gguf, prompts):
    default, exact = _engine(smollm2_gguf, "auto"), _engine(smollm2_gguf, "float32")
    model = default.runner.model
    assert model.model.row_decode is not None and isinstance(model.lm_head, GemvLinear)
    assert model.lm_head.kind == "q8" and model.lm_head.kernel is not None
    expected = exact.generate(prompts, GREEDY)
    assert [default.generate([p], GREEDY)[0] for p in prompts] == expected
    assert default.generate(prompts, GREEDY) == expected
