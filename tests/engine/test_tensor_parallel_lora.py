"""LoRA adapters under tensor parallelism (CPU, gloo, T=2 over uneven K/V groups) and pipeline parallelism (P=2,
each stage wrapping and packing only its layers): under T each rank holds its cut of
every adapter (column-parallel projections: A whole, B's rows; row-parallel: A's columns, B whole, the update added
before the all-reduce), and the driver's loads, unloads and slot writes are replayed by the other rank. Adapters
loaded at start and at run time, more adapters than slots (evictions), an unload and a reload into the freed slot
give the single-process engine's logits within 1e-4 in fp32 and its tokens over 32 steps."""
from __future__ import annotations

import pytest
import torch

from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from tests.engine.family_checks import PROMPTS, engine_config, stepped_logits
from tests.engine.lora_files import MLP, write_lora_adapter
from tests.engine.tiny_models import write_tiny_family

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-lora")
    base = write_tiny_family(root / "base", "llama", seed=6, num_attention_heads=6, num_key_value_heads=3,
                             hidden_size=96)
    return base, {"a": write_lora_adapter(base, root / "a", r=4, alpha=8, seed=1),
                  "b": write_lora_adapter(base, root / "b", r=8, alpha=8, targets=("q_proj", "o_proj") + MLP,
                                          seed=2),
                  "c": write_lora_adapter(base, root / "c", r=2, alpha=4, targets=("k_proj", "v_proj", "down_proj"),
                                          seed=3),
                  "d": write_lora_adapter(base, root / "d", r=16, alpha=16,
                                          targets=("q_proj", "k_proj", "v_proj", "o_proj") + MLP, seed=4)}


# Tensor parallelism, and pipeline parallelism (one layer a stage, two batches in flight: a batch's slot writes
# happen before the last stage of the batch in flight has run).
LAYOUTS = {"t2": dict(tensor_parallel_size=2), "p2": dict(pipeline_parallel_size=2)}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def engines(request, adapters):
    base, dirs = adapters
    kw = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=4, lora_modules=(("a", str(dirs["a"])),))
    single = Engine(engine_config(base, **kw))
    parallel = Engine(engine_config(base, **LAYOUTS[request.param], **kw))
    for engine in (single, parallel):
        engine.load_adapter("b", str(dirs["b"]))
        engine.load_adapter("c", str(dirs["c"]))
    yield single, parallel
    parallel.shutdown()


def run(engine: Engine, requests: dict[str, str | None]) -> dict[str, list[int]]:
    """32 greedy tokens of PROMPTS[0] on each request's adapter; more adapters than slots, so some wait and
    evict others."""
    e = engine.with_scheduling()
    for rid, adapter in requests.items():
        e.add_request(rid, PROMPTS[0], GREEDY, adapter=adapter)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while e.has_work():
        for o in e.step():
            tokens[o.request_id].extend(o.new_token_ids)
    return tokens


def test_logits_with_adapters_equal_single_process(engines):
    single, parallel = engines
    names = ["a", "b", None]
    checked = 0
    with torch.no_grad():
        for (seq_a, a), (seq_b, b) in zip(stepped_logits(single, PROMPTS, 6, names),
                                          stepped_logits(parallel, PROMPTS, 6, names), strict=True):
            assert seq_a == seq_b
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == len(PROMPTS) * 6


def test_tokens_with_evictions_unload_and_reload_equal_single_process(engines, adapters):
    single, parallel = engines
    requests = {"base": None, "on-a": "a", "on-b": "b", "on-c": "c"}
    expected = run(single, requests)
    assert len({tuple(t) for t in expected.values()}) == 4   # every adapter changes the tokens
    parallel.runner.peak_steps_in_flight = 0
    assert run(parallel, requests) == expected
    if parallel.config.pipeline_parallel_size > 1:   # two batches were in flight while slots were written
        assert parallel.runner.peak_steps_in_flight == 2
    for engine in (single, parallel):   # b's slot is cleared on every rank; d is written into a freed slot
        engine.begin_unload_adapter("b")
        assert engine.drop_drained_adapters() == [("b", 0)]
        engine.load_adapter("d", str(adapters[1]["d"]))
    requests = {"on-d": "d", "on-c": "c", "base": None}
    assert run(parallel, requests) == run(single, requests)
