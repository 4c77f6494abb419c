"""quantization_config parsing: what is served, and a precise refusal for what is not."""
from __future__ import annotations

import pytest

from engine_svc.quant.checkpoint_config import PackedQuantConfig, parse_quantization_config


def test_unquantized_checkpoint_has_none():
    assert parse_quantization_config({"hidden_size": 8}) is None


def test_awq_gemm():
    cfg = parse_quantization_config({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}})
    assert cfg == PackedQuantConfig("awq", 4, 128)


def test_gptq_v1_default_and_v2():
    v1 = parse_quantization_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": -1, "sym": True, "desc_act": False}})
    assert v1 == PackedQuantConfig("gptq", 4, -1, sym=True, zero_minus_one=True)
    assert v1.group_for(96) == 96
    v2 = parse_quantization_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}})
    assert not v2.zero_minus_one and v2.group_for(64) == 32
    with pytest.raises(ValueError, match="does not divide"):
        v2.group_for(48)


@pytest.mark.parametrize("qcfg,message", [
    ({"quant_method": "awq", "bits": 8}, "8 bits"),
    ({"quant_method": "gptq", "bits": 3}, "3 bits"),
    ({"quant_method": "awq", "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "zero_point": False}, "without zero points"),
    ({"quant_method": "awq", "modules_to_not_convert": ["lm_head", "mlp.gate"]}, r"modules \['mlp.gate'\]"),
    ({"quant_method": "gptq", "desc_act": True}, "desc_act"),
    ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "gptq", "group_size": 0}, "positive or -1"),
    ({"quant_method": "gptq", "group_size": 33}, "odd"),
    ({"quant_method": "bitsandbytes"}, "unsupported checkpoint quantization"),
])
def test_refusals(qcfg, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization_config({"quantization_config": qcfg})


def test_desc_act_with_static_groups_is_accepted():
    cfg = parse_quantization_config({"quantization_config": {
        "quant_method": "gptq", "desc_act": True, "static_groups": True}})
    assert cfg.desc_act
