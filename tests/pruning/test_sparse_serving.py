"""Serving pruned checkpoints: the start-up decision (kernels, dense, or one clear error), the per-shape kernel
choice with a measurement passed in (so it runs without a GPU), and, on a CUDA GPU of compute capability >= 8.0,
the compressed linears themselves."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from engine_svc.config import EngineConfig
from engine_svc.model_config import ModelConfig
from engine_svc.pruning import kernel_choice, sparse_serving
from engine_svc.pruning.kernel_choice import choose_sparse_linears, geometric_speedup, measured_batches
from engine_svc.pruning.sparse_serving import plan_sparse_serving
from engine_svc.pruning.sparsity_config import sparsity_entry
from engine_svc.pruning.spec import parse_sparsity

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _config(sparsity: str | None) -> ModelConfig:
    extra = {} if sparsity is None else {"sparsity_config": sparsity_entry(parse_sparsity(sparsity), "wanda",
                                                                           ["q_proj"], None)}
    return ModelConfig("LlamaForCausalLM", "tiny", 320, 64, 128, 2, 4, 2, 16, 1e-5, 1e4, 256, False, extra=extra)


def test_on_the_cpu_a_pruned_checkpoint_is_served_dense_and_says_so():
    plan = plan_sparse_serving(_config("2:4"), CPU, torch.float32, "none", "auto")
    assert not plan.kernels and "served dense: the 2:4 kernels need a CUDA GPU" in plan.note
    assert "4:8 pruned checkpoint served dense (the sparse kernels run 2:4 only)" in \
        plan_sparse_serving(_config("4:8"), CPU, torch.float32, "none", "auto").note
    assert "0.5 unstructured" in plan_sparse_serving(_config("0.5"), CPU, torch.float32, "none", "auto").note
    assert plan_sparse_serving(_config(None), CPU, torch.float32, "int4", "auto") == sparse_serving.SparseServing(False)
    off = plan_sparse_serving(_config("2:4"), CPU, torch.float32, "int4", "off")   # dense, then quantized: fine
    assert not off.kernels and "sparse kernels off" in off.note


@pytest.mark.parametrize("sparsity, quantization, setting, message", [
    ("2:4", "int4", "auto", "cannot run on the sparse kernels with --quantization int4"),
    ("2:4", "int8", "on", "cannot run on the sparse kernels with --quantization int8"),
    ("2:4", "none", "on", "on: the 2:4 kernels need a CUDA GPU"),
    ("4:8", "none", "on", "this checkpoint is 4:8 sparse; the kernels run 2:4 only"),
    (None, "none", "on", "needs a 2:4 pruned checkpoint"),
])
def test_combinations_that_cannot_work_fail_at_start_with_what_to_change(sparsity, quantization, setting, message):
    with pytest.raises(ValueError, match=message):
        plan_sparse_serving(_config(sparsity), CPU, torch.float32, quantization, setting)


def test_a_capable_gpu_gets_the_kernels(monkeypatch):
    monkeypatch.setattr(sparse_serving, "kernels_unavailable", lambda device, dtype: None)
    assert plan_sparse_serving(_config("2:4"), CUDA, torch.bfloat16, "none", "auto").kernels
    assert plan_sparse_serving(_config("2:4"), CUDA, torch.bfloat16, "none", "on").kernels


def test_the_engine_refuses_a_2_4_checkpoint_with_int4_and_kernels_with_lora(tmp_path):
    from engine_svc.engine import Engine
    from tests.engine.tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny")
    config = json.loads((path / "config.json").read_text())
    config["sparsity_config"] = sparsity_entry(parse_sparsity("2:4"), "magnitude", ["q_proj"], None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--sparsity-kernels off to quantize the pruned weights"):
        Engine(EngineConfig(model=str(path), device="cpu", quantization="int4", num_kv_blocks=8))
    with pytest.raises(ValueError, match="sparsity_kernels on cannot serve LoRA"):
        EngineConfig(model=str(path), sparsity_kernels="on", enable_lora=True)
    with pytest.raises(ValueError, match="sparsity_kernels must be one of"):
        EngineConfig(model=str(path), sparsity_kernels="maybe")


def _linears(*shapes: tuple[int, int]) -> list[tuple[str, nn.Linear]]:
    return [(f"l{i}", nn.Linear(k, n, bias=False)) for i, (n, k) in enumerate(shapes)]


def test_each_shape_is_measured_once_and_goes_sparse_only_where_it_is_faster():
    linears = _linears((128, 64), (256, 64), (128, 64), (100, 64), (256, 64))
    speed = {(128, 64): {1: (1.0, 2.0), 16: (1.0, 1.0), 64: (2.0, 1.0), 256: (4.0, 1.0)},   # x1.41: sparse
             (256, 64): {1: (1.0, 1.2), 16: (1.0, 1.0), 64: (1.1, 1.0), 256: (1.1, 1.0)}}   # x1.00: dense
    measured, converted = [], []

    def measure(linear, batches):
        measured.append(((linear.out_features, linear.in_features), batches))
        return {m: speed[(linear.out_features, linear.in_features)][m] for m in batches}

    choices = choose_sparse_linears(linears, (1, 16, 64, 256), measure, converted.append)
    assert measured == [((128, 64), (1, 16, 64, 256)), ((256, 64), (1, 16, 64, 256))]   # (100, 64) does not fit
    assert [(c.shape, c.sparse) for c in choices] == [((128, 64), True), ((256, 64), False), ((100, 64), False)]
    assert converted == [linears[0][1], linears[2][1]]
    assert choices[0].speedup == pytest.approx(math.sqrt(2)) and "x1.41" in choices[0].reason
    assert math.isnan(choices[2].speedup) and "not a multiple of 32 x 64" in choices[2].reason
    assert geometric_speedup({1: (2.0, 1.0), 2: (1.0, 2.0)}) == pytest.approx(1.0)
    assert measured_batches(2048) == (1, 16, 64, 256) and measured_batches(32) == (1, 16) and \
        measured_batches(0) == (1,)
    assert "128x64 sparse (measured x1.41" in kernel_choice.describe(choices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compressed_linears_match_dense_and_count_their_stored_bytes():
    from engine_svc.pruning.scores import pruned
    from engine_svc.pruning.semi_sparse_linear import compress_weight, kernels_unavailable, stored_bytes
    from engine_svc.worker.memory_plan import weights_bytes

    if kernels_unavailable(CUDA, torch.bfloat16):
        pytest.skip(kernels_unavailable(CUDA, torch.bfloat16))
    linear = nn.Linear(512, 256, bias=False).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(pruned(linear.weight, parse_sparsity("2:4")))
    x = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16)
    dense_out, dense_bytes = linear(x), weights_bytes(linear)
    compress_weight(linear)
    torch.testing.assert_close(linear(x), dense_out, rtol=1e-2, atol=1e-2)
    assert stored_bytes(linear.weight) == weights_bytes(linear) < 0.6 * dense_bytes
    choices = kernel_choice.apply_sparse_kernels(_linears((256, 512)), 256)
    assert choices[0].shape == (256, 512) and math.isfinite(choices[0].speedup)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_sparse_kernels_give_the_dense_greedy_tokens(tmp_path, monkeypatch, enforce_eager):
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine
    from engine_svc.pruning.prune_command import run_prune
    from engine_svc.pruning.semi_sparse_linear import is_compressed, kernels_unavailable
    from tests.pruning.tiny_checkpoints import prune_config, write_tiny_source

    if kernels_unavailable(CUDA, torch.bfloat16):
        pytest.skip(kernels_unavailable(CUDA, torch.bfloat16))
    source = write_tiny_source(tmp_path / "source")
    config = prune_config(source, tmp_path / "pruned", "magnitude", "2:4", tmp_path / "unused")
    run_prune(config)
    monkeypatch.setattr(kernel_choice, "MIN_SPEEDUP", 0.0)   # every shape that fits goes sparse, whatever it measures
    prompts = [[1, 70, 108, 105, 99, 101], [1, 84, 104, 101, 32, 82, 97, 98, 98, 105, 116, 32]]
    outputs = {}
    for setting in ("on", "off"):
        engine = Engine(EngineConfig(model=str(config.output), device="cuda", dtype="bfloat16", num_kv_blocks=32,
                                     sparsity_kernels=setting, enforce_eager=enforce_eager))
        compressed = [is_compressed(m.weight) for m in (engine.runner.model.model.layers[0].self_attn.qkv_proj,
                                                         engine.runner.model.model.layers[0].mlp.down_proj)]
        assert compressed == [setting == "on"] * 2
        outputs[setting] = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        engine.shutdown()
    assert outputs["on"] == outputs["off"]
