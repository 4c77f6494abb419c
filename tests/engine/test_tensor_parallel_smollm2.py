"""SmolLM2-135M (the default GGUF: 9 query heads, 3 K/V heads, tied embeddings) at T=2, where the heads split
unevenly (one K/V group on rank 0, two on rank 1), and at P=2 (15 layers a stage; the last stage reads the
embedding as its lm_head): the same greedy tokens as one process. Its own module, since a test process holds
one process group at a time (each test stops its workers before the next starts)."""
from __future__ import annotations

import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356, 31], [1, 4093, 3458, 314]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def single(smollm2_gguf):
    """The config and one process's greedy tokens."""
    kw = dict(model=str(smollm2_gguf), device="cpu", dtype="float32", num_kv_blocks=32, max_model_len=512)
    return kw, Engine(EngineConfig(**kw)).generate(PROMPTS, GREEDY)


def test_smollm2_greedy_tokens_equal_one_process_at_t2(single):
    kw, expected = single
    parallel = Engine(EngineConfig(**kw, tensor_parallel_size=2))
    try:
        assert parallel.runner.kv_caches[0].data.shape[3] == 1   # rank 0 holds 1 of the 3 K/V heads
        assert parallel.generate(PROMPTS, GREEDY) == expected
    finally:
        parallel.shutdown()


def test_smollm2_greedy_tokens_equal_one_process_at_p2(single):
    kw, expected = single
    parallel = Engine(EngineConfig(**kw, pipeline_parallel_size=2))
    try:
        assert parallel.runner.layers == (15, 30) and len(parallel.runner.kv_caches) == 15
        assert parallel.generate(PROMPTS, GREEDY) == expected
    finally:
        parallel.shutdown()
