"""SmolLM2-135M (the default GGUF: 9 query heads, 3 K/V heads) at T=2, where the heads split unevenly (one K/V
group on rank 0, two on rank 1): the same greedy tokens as one process. Its own module, since a test process holds
one tensor-parallel group at a time."""
from __future__ import annotations

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


def test_smollm2_greedy_tokens_equal_one_process_at_t2(smollm2_gguf):
    kw = dict(model=str(smollm2_gguf), device="cpu", dtype="float32", num_kv_blocks=32, max_model_len=512)
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 31], [1, 4093, 3458, 314]]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = Engine(EngineConfig(**kw)).generate(prompts, greedy)
    parallel = Engine(EngineConfig(**kw, tensor_parallel_size=2))
    try:
        assert parallel.runner.kv_caches[0].data.shape[3] == 1   # rank 0 holds 1 of the 3 K/V heads
        assert parallel.generate(prompts, greedy) == expected
    finally:
        parallel.shutdown()
