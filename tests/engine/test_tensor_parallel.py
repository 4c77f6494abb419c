"""Tensor parallelism on the CPU (gloo, worker processes): tiny random checkpoints of each Llama-shaped family run
at T=2 (and T=4 where the heads allow) give the single-process engine's logits within 1e-4 in fp32 and the same
tokens over 32 steps with chunked prefill, a prefix-cache hit, preemption and n > 1 in the run.

Each case starts its workers once (module-scoped fixture; one process group per test process at a time, so the
cases run one after the other)."""
from __future__ import annotations

import pytest

from engine_svc.core.request import SamplingParams
from engine_svc.distributed.partition import head_shard, vocab_shard
from tests.engine.family_checks import PROMPTS, assert_same_stepped_logits, run_mixed, single_and_parallel
from tests.engine.tiny_models import write_tiny_family

# name -> (family, ranks, config overrides)
CASES = {
    # 3 K/V heads over 2 ranks: 1 and 2 groups (uneven), 6 query heads; an odd vocabulary pads the last shard.
    "llama-uneven-t2": ("llama", 2, dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                                         vocab_size=321)),
    # 2 K/V heads over 4 ranks: each replicated on two; tied embeddings (vocabulary-parallel, shared with lm_head).
    "llama-tied-t4": ("llama", 4, dict(tie_word_embeddings=True)),
    "mistral-window-t2": ("mistral", 2, dict(sliding_window=5)),
    "qwen2-t2": ("qwen2", 2, {}),                                            # q/k/v bias, sharded with the rows
    "qwen3-bias-t2": ("qwen3", 2, dict(head_dim=32, attention_bias=True)),  # o_proj bias after the all-reduce
}


@pytest.fixture(scope="module", params=sorted(CASES))
def engines(request, tmp_path_factory):
    """(single-process engine, tensor-parallel engine) over the same checkpoint."""
    family, ranks, overrides = CASES[request.param]
    path = write_tiny_family(tmp_path_factory.mktemp(request.param), family, seed=3, **overrides)
    with single_and_parallel(path, tensor_parallel_size=ranks) as pair:
        yield pair


def test_prefill_and_decode_logits_equal_single_process(engines):
    assert_same_stepped_logits(*engines)


def test_tokens_equal_single_process_with_chunking_prefix_hits_preemption_and_n(engines):
    single, parallel = engines
    expected, preemptions, hits = run_mixed(single)
    assert preemptions > 0 and hits > 0        # the run exercises what it claims to
    assert len(expected) == 5 and all(len(t) == 32 for t in expected.values())
    assert run_mixed(parallel) == (expected, preemptions, hits)


def test_async_scheduling_feeds_the_driver_sampled_ids_to_every_rank(engines):
    """Placeholder ids (a step launched before the previous one's ids are read) come from the driver's sampled
    ids, broadcast to the other ranks on the device."""
    single, parallel = engines
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = single.with_scheduling(async_scheduling=False).generate(PROMPTS, greedy)
    assert parallel.with_scheduling(async_scheduling=True).generate(PROMPTS, greedy) == expected


def test_the_driver_caches_only_its_own_kv_heads(engines):
    _, parallel = engines
    # In every case rank 0 holds one K/V head of the model's 2 or 3 (its group, or its replicated head).
    assert parallel.model_cfg.num_kv_heads > 1
    assert parallel.runner.kv_caches[0].data.shape[3] == 1


@pytest.mark.parametrize("heads, kv, ranks, expected", [
    (9, 3, 2, [(0, 3, 0, 1), (3, 9, 1, 3)]),                 # SmolLM2 at T=2: whole groups, unevenly
    (8, 8, 4, [(0, 2, 0, 2), (2, 4, 2, 4), (4, 6, 4, 6), (6, 8, 6, 8)]),
    (71, 1, 2, [(0, 35, 0, 1), (35, 71, 0, 1)]),            # Falcon-7B's multi-query: the K/V head replicated
    (4, 2, 4, [(0, 1, 0, 1), (1, 2, 0, 1), (2, 3, 1, 2), (3, 4, 1, 2)]),
])
def test_head_partition(heads, kv, ranks, expected):
    got = [head_shard(heads, kv, ranks, r) for r in range(ranks)]
    assert [(h.q_start, h.q_stop, h.kv_start, h.kv_stop) for h in got] == expected


def test_partitions_that_cannot_split_are_refused_by_name():
    with pytest.raises(ValueError, match="4 query heads with 2 K/V heads cannot split over 8"):
        head_shard(4, 2, 8, 0)
    with pytest.raises(ValueError, match="cannot split over 3"):
        head_shard(8, 2, 3, 0)


def test_vocab_shards_are_padded_to_equal_size():
    shards = [vocab_shard(321, 2, r) for r in range(2)]
    assert [(s.start, s.stop, s.padded) for s in shards] == [(0, 161, 161), (161, 321, 161)]


def test_engine_options_parse_and_are_checked():
    from engine_svc.config import config_from_args
    cfg = config_from_args(["--model", "m", "--tensor-parallel-size", "2", "--distributed-timeout-s", "30"])
    assert (cfg.tensor_parallel_size, cfg.distributed_executor, cfg.distributed_timeout_s) == (2, "mp", 30.0)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        config_from_args(["--model", "m", "--tensor-parallel-size", "0"])
