"""Memory tiers never change what is generated (greedy, fp32, CPU, where every copy and buffer handover is real):
prefix hits served from the host KV tier (--kv-offload-gb) give the outputs of recomputing them, and the tier did
serve hits; decoder layers streamed from host memory through reused staging sets (--cpu-offload-gb, half the
layers) give the outputs of resident ones. On a tiny random Llama and on SmolLM2. Every run ends with no block in
use and no host slot pinned."""
from __future__ import annotations

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.service.engine_loop import EngineLoop
from engine_svc.service.proto_convert import load_to_pb
from tests.engine.tiny_models import write_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def rotating_prefixes(systems: list[list[int]], rounds: int) -> list[list[int]]:
    """Each round asks every system prompt once, with a new question: the working set of prefixes is larger than a
    small device pool, so by the time a prefix comes back, LRU has evicted it there."""
    return [system + [20 + r, 30 + i, 40 + r] for r in range(rounds) for i, system in enumerate(systems)]


def run_one_by_one(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    outs = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    if engine.kv.host is not None:
        assert engine.kv.host.num_pinned == 0
    return outs


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Engine:
    model = write_tiny_llama(tmp_path_factory.mktemp("tiny-tiers"), seed=5, max_position_embeddings=256)
    # 2 layers x K/V x 4 tokens x 2 heads x 16 dims x 4 bytes = 2 KiB a block: 1e-4 GB holds 52 of them.
    return Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", block_size=4, num_kv_blocks=12,
                               max_model_len=256, max_num_batched_tokens=64, kv_offload_gb=1e-4))


def test_tiny_model_host_tier_hits_give_the_outputs_of_recomputing(tiny_base):
    systems = [[(k * i + 3) % 300 + 10 for i in range(22)] for k in (3, 5, 7, 11)]   # 5 full blocks each
    prompts = rotating_prefixes(systems, rounds=2)
    reference = run_one_by_one(tiny_base.with_scheduling(enable_prefix_caching=False, kv_offload_gb=0), prompts)
    device_only = tiny_base.with_scheduling(kv_offload_gb=0)
    assert run_one_by_one(device_only, prompts) == reference
    tiered = tiny_base.with_scheduling()
    assert run_one_by_one(tiered, prompts) == reference
    host = tiered.kv.host
    # 12 device blocks hold about one conversation: every return of a prefix in the second round is a host hit.
    assert host.stats.loaded_blocks >= 4 * 5 and host.stats.offloaded_blocks > 0
    assert tiered.kv.prefix_stats.hits > device_only.kv.prefix_stats.hits
    blocks, used, hits, offloaded, loaded = tiered.host_kv_stats()
    assert (blocks, hits, loaded) == (52, host.stats.loaded_blocks, hits * 2048) and 0 < used <= 52
    load = load_to_pb(EngineLoop(tiered).load)   # what GetLoad answers
    assert (load.host_kv_blocks_total, load.host_kv_blocks_used, load.host_kv_hits) == (52, used, hits)
    assert (load.host_kv_bytes_offloaded, load.host_kv_bytes_loaded) == (offloaded, loaded) and offloaded > 0


def test_tiny_model_host_tier_under_a_burst_with_preemption(tiny_base):
    """All at once, in 7-token chunks, on a pool small enough to preempt: loads, offloads and recomputation mix
    within steps."""
    systems = [[(k * i + 1) % 300 + 10 for i in range(13)] for k in (3, 5, 7)]
    prompts = rotating_prefixes(systems, rounds=4)
    recompute = tiny_base.with_scheduling(enable_prefix_caching=False, kv_offload_gb=0, num_kv_blocks=64)
    reference = recompute.generate(prompts, GREEDY)
    for async_scheduling in (False, True):   # asynchronous: a step's loads stay pinned while the next is scheduled
        tiered = tiny_base.with_scheduling(num_kv_blocks=10, max_num_batched_tokens=7, max_num_seqs=4,
                                           async_scheduling=async_scheduling)
        first = tiered.generate(prompts[:6], GREEDY)
        assert first + tiered.generate(prompts[6:], GREEDY) == reference
        assert tiered.kv.host.stats.loaded_blocks > 0 and tiered.scheduler.num_preemptions > 0
        assert tiered.check_integrity() == [] and tiered.kv.num_used_blocks == 0 and tiered.kv.host.num_pinned == 0


def test_a_step_whose_copies_fail_forgets_them_and_the_engine_goes_on(tiny_base, monkeypatch):
    systems = [[(k * i + 2) % 300 + 10 for i in range(22)] for k in (3, 5, 7, 11)]
    prompts = rotating_prefixes(systems, rounds=1)
    reference = run_one_by_one(tiny_base.with_scheduling(enable_prefix_caching=False, kv_offload_gb=0), prompts)
    tiered = tiny_base.with_scheduling()
    assert run_one_by_one(tiered, prompts) == reference   # the first prefixes are in the host tier now
    run_copies = tiered.runner.host_kv.run

    def fail_with_loads(copies):
        if copies.loads:
            raise RuntimeError("copy failed")
        run_copies(copies)

    monkeypatch.setattr(tiered.runner.host_kv, "run", fail_with_loads)
    tiered.add_request("doomed", prompts[0], GREEDY)
    outputs = tiered.step()
    assert [(o.request_id, o.error) for o in outputs] == [("doomed", "RuntimeError: copy failed")]
    assert tiered.check_integrity() == [] and tiered.kv.host.num_pinned == 0
    monkeypatch.setattr(tiered.runner.host_kv, "run", run_copies)
    assert run_one_by_one(tiered, prompts[:1]) == reference[:1]   # nothing the failed copies touched is served


def test_options_that_cannot_combine_are_refused_at_once():
    with pytest.raises(ValueError, match="tensor_parallel_size and pipeline_parallel_size 1"):
        EngineConfig(model="m", kv_offload_gb=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="LoRA"):
        EngineConfig(model="m", cpu_offload_gb=1, enable_lora=True)
    with pytest.raises(ValueError, match="needs prefix caching"):
        EngineConfig(model="m", kv_offload_gb=1, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_offload_gb must be >= 0"):
        EngineConfig(model="m", kv_offload_gb=-1)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny8"), seed=7, num_layers=8)


# One layer is 64 x (128 + 64 + 256 + 128) weights + 2 norms of 64: 148 KB in fp32, 39 KB as int8 (plus scales).
@pytest.mark.parametrize("quantization,budget_bytes", [("none", 0.6e6), ("int8", 0.17e6)])
def test_tiny_model_weight_offload_gives_the_outputs_of_resident_layers(tiny8, quantization, budget_bytes):
    cfg = dict(model=str(tiny8), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=256,
               max_num_batched_tokens=16, quantization=quantization)   # chunked prompts beside decodes
    prompts = [[(3 * i + k) % 300 + 10 for i in range(n)] for k, n in ((1, 5), (2, 23), (3, 40))]
    reference = Engine(EngineConfig(**cfg)).generate(prompts, GREEDY)
    engine = Engine(EngineConfig(**cfg, cpu_offload_gb=budget_bytes / (1 << 30)))
    offload = engine.runner.weight_offload
    assert offload.layer_ids == [0, 2, 4, 6] and engine.runner.plan.offloaded_bytes == offload.offloaded_bytes
    layers = [engine.runner.model.model.layers[i] for i in offload.layer_ids]
    down = [layer.mlp.down_proj for layer in layers]
    tensor = (lambda m: m.weight) if quantization == "none" else (lambda m: m.qweight)   # noqa: E731
    assert tensor(down[0]).dtype == (torch.float32 if quantization == "none" else torch.int8)   # stays packed
    ptr = [tensor(m).data_ptr() for m in down]
    assert ptr[0] == ptr[2] != ptr[1] == ptr[3]   # two staging sets, reused in turn
    assert engine.generate(prompts, GREEDY) == reference
    assert engine.generate(prompts[::-1], GREEDY) == reference[::-1]


def test_smollm2_outputs_with_both_tiers_equal_those_without(smollm2_gguf):
    from tokenizer_svc.loading import load_tokenizer

    tok = load_tokenizer(str(smollm2_gguf))
    systems = [tok.encode_text(f"You are assistant number {n}. Answer briefly, in one short sentence, and "
                               f"never use lists.\nQuestion:") for n in ("one", "two")]
    prompts = rotating_prefixes(systems, rounds=2)
    base = Engine(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", block_size=8,
                               num_kv_blocks=5, max_model_len=128, max_num_batched_tokens=128,
                               kv_offload_gb=0.02))
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    recompute = base.with_scheduling(enable_prefix_caching=False, kv_offload_gb=0)
    reference = [recompute.generate([p], short)[0] for p in prompts]
    tiered = base.with_scheduling()
    assert [tiered.generate([p], short)[0] for p in prompts] == reference
    assert tiered.kv.host.stats.loaded_blocks >= 2
    assert tiered.check_integrity() == [] and tiered.kv.host.num_pinned == 0
    del base, tiered
    # Weight offload: 14 of the 30 layers (about 14 MB each in fp32; the count is rounded down to an even one).
    offloaded = Engine(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", block_size=8,
                                    num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=128,
                                    enable_prefix_caching=False, cpu_offload_gb=0.2))
    assert offloaded.runner.weight_offload.num_offloaded == 14
    assert offloaded.generate(prompts, short) == reference


def test_an_offloading_model_loads_in_host_memory_but_fp8():
    from engine_svc.worker.weight_offload import load_device
    cuda = torch.device("cuda", 0)
    assert load_device(cuda, "none") == load_device(cuda, "int8") == torch.device("cpu")
    assert load_device(cuda, "fp8") == cuda   # its loader checks the device it loads on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_load_never_holds_the_offloaded_layers(tiny8):
    """The device's peak while starting stays below the whole model: offloaded layers never reach it whole."""
    cfg = dict(model=str(tiny8), device="cuda", dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=256)
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(EngineConfig(**cfg, cpu_offload_gb=0.6e6 / (1 << 30)))
    assert engine.runner.weight_offload.num_offloaded == 4   # of 8 layers, 2 staging sets: 2 layers fewer
    # Every layer's size (an offloaded layer's tensors are views of a staging set); loading all of them on the
    # device and then moving some out would peak above it.
    whole = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    assert torch.cuda.max_memory_allocated() - engine.runner.plan.kv_bytes < whole
    assert engine.generate([[5, 6, 7]], GREEDY) == Engine(EngineConfig(**cfg)).generate([[5, 6, 7]], GREEDY)
