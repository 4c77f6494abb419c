"""Tiny AWQ / GPTQ checkpoint directories (config.json with quantization_config + safetensors): detected, planned,
and streamed into int4 buffers that dequantize to the reference checkpoint's weights exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_svc.loader import read_model_config
from engine_svc.loader.hf_loader import iter_safetensors
from engine_svc.loader.quantized_load import plan_quantized_load
from engine_svc.quant.int4_format import dequantize_int4
from engine_svc.quant.packed_checkpoint import convert_packed_weights
from tests.quant.tiny_packed import write_packed_pair


@pytest.fixture(scope="module", params=["awq", "gptq"])
def packed_pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, *write_packed_pair(root, request.param))


def test_stream_dequantizes_to_the_reference(packed_pair):
    method, quantized, reference = packed_pair
    cfg = read_model_config(quantized)
    assert cfg.checkpoint_quantization.method == method
    plan = plan_quantized_load(quantized, cfg, "none", "weights")
    assert plan.kind == "int4" and plan.group_size == 32
    ref = dict(iter_safetensors(reference))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    passed = {}
    for name, t in convert_packed_weights(iter_safetensors(quantized), plan.packed):
        layer, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "scales", "offsets"):
            layers.setdefault(layer, {})[leaf] = t
        else:
            passed[name] = t
    assert len(layers) == 2 * 7
    for layer, b in layers.items():
        w = dequantize_int4(b["qweight"], b["scales"], b["offsets"], 32)
        assert torch.equal(w, ref[f"{layer}.weight"]), layer
    assert passed.keys() == {k for k in ref if k.rpartition(".")[0] not in layers}
    assert all(torch.equal(t, ref[k]) for k, t in passed.items())


def test_plan_refuses_another_quantization_on_a_packed_checkpoint(packed_pair):
    method, quantized, _ = packed_pair
    cfg = read_model_config(quantized)
    with pytest.raises(ValueError, match=f"4-bit {method.upper()} checkpoint; --quantization int8"):
        plan_quantized_load(quantized, cfg, "int8", "weights")


def test_plan_for_plain_checkpoints_and_gguf(packed_pair, smollm2_gguf):
    _, _, reference = packed_pair
    assert plan_quantized_load(reference, read_model_config(reference), "int4", "weights") is None
    gguf_cfg = read_model_config(smollm2_gguf)
    assert plan_quantized_load(smollm2_gguf, gguf_cfg, "none", "weights") is None
    assert plan_quantized_load(smollm2_gguf, gguf_cfg, "int4", "weights").group_size == 32
    assert plan_quantized_load(smollm2_gguf, gguf_cfg, "int8", "weights").kind == "int8"
