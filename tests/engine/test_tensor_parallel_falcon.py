"""Falcon under tensor parallelism (CPU, gloo): the multi-query layout at T=2 (its one K/V head replicated on both
ranks, the query heads split; parallel attention and MLP summed in one all-reduce) and multi-head sequential layers
with biases and an untied, odd-sized vocabulary give the single-process engine's logits within 1e-4 in fp32 and the
same tokens over 32 steps with chunked prefill, a prefix-cache hit, preemption and n > 1 in the run.

The checks are tests/engine/test_tensor_parallel.py's, collected here again over this module's `engines`."""
from __future__ import annotations

import pytest

from engine_svc.engine import Engine
from tests.engine.test_family_falcon import write_tiny_falcon
from tests.engine.family_checks import engine_config
from tests.engine.test_tensor_parallel import (  # noqa: F401 - collected as this module's tests
    test_async_scheduling_feeds_the_driver_sampled_ids_to_every_rank,
    test_prefill_and_decode_logits_equal_single_process,
    test_tokens_equal_single_process_with_chunking_prefix_hits_preemption_and_n)

CASES = {
    # Falcon-7B's layout (with biases, to check they are added once after the shared all-reduce).
    "falcon-multi-query-parallel-t2": dict(multi_query=True, parallel_attn=True, bias=True),
    "falcon-mha-sequential-t2": dict(multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False,
                                     vocab_size=321),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def engines(request, tmp_path_factory):
    path = write_tiny_falcon(tmp_path_factory.mktemp(request.param), seed=5, **CASES[request.param])
    single = Engine(engine_config(path))
    parallel = Engine(engine_config(path, tensor_parallel_size=2))
    yield single, parallel
    parallel.shutdown()
    assert all(not p.is_alive() for p in parallel.executor.workers)


def test_each_rank_caches_its_kv_heads(engines):
    single, parallel = engines
    kv = single.model_cfg.num_kv_heads
    # multi-query: the one K/V head on both ranks; multi-head: half of them each
    assert parallel.runner.kv_caches[0].data.shape[3] == (1 if kv == 1 else kv // 2)
    assert parallel.runner.model.transformer.h[0].self_attention.num_heads == single.model_cfg.num_heads // 2
