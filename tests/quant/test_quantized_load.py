"""load_model with quantized linears filled straight from the checkpoint: tiny AWQ / GPTQ directories (detected from
their quantization_config) against transformers on the dequantized reference checkpoint, and the real Q4_1
SmolLM2 GGUF with --quantization int4 / int8 against its dequantized float32 load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_svc.core.request import SamplingParams
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_format import quantize_int8
from engine_svc.quant.int8_linear import Int8Linear
from tests.engine.family_checks import assert_greedy_matches, assert_logits_match, hf_model, make_engine, stepped_logits
from tests.quant.tiny_packed import write_packed_pair


@pytest.fixture(scope="module", params=["awq", "gptq"])
def packed_pair(request, tmp_path_factory):
    return write_packed_pair(tmp_path_factory.mktemp(request.param), request.param)


def test_packed_checkpoint_loads_into_int4_and_matches_the_reference(packed_pair):
    quantized, reference = packed_pair
    engine = make_engine(quantized)
    model = engine.runner.model
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers") and not list(m.children())
               and isinstance(m, (nn.Linear, Int4Linear))]
    assert linears and all(isinstance(m, Int4Linear) and m.group_size == 32 for m in linears)
    ref = hf_model(reference)
    assert_logits_match(engine, ref, steps=4)
    assert_greedy_matches(engine, ref, n=8)


def test_packed_checkpoint_refuses_another_quantization(packed_pair):
    quantized, _ = packed_pair
    with pytest.raises(ValueError, match="cannot apply"):
        make_engine(quantized, quantization="int8")


SMOL_PROMPT = [1, 4093, 314, 260, 3575, 282, 4649, 47]


def _smol_engine(path, quantization):
    return make_engine(path, quantization=quantization, block_size=16, num_kv_blocks=16, max_num_seqs=1)


@pytest.fixture(scope="module")
def smol_float(smollm2_gguf):
    return _smol_engine(smollm2_gguf, "none")


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_smollm2_gguf_quantized_load_matches_the_float_load(smollm2_gguf, smol_float, quantization):
    engine = _smol_engine(smollm2_gguf, quantization)
    float_layers = smol_float.runner.model.model.layers
    for i, layer in enumerate(engine.runner.model.model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            ours, ref = layer.get_submodule(name), float_layers[i].get_submodule(name).weight
            if quantization == "int4":   # Q4_1 blocks map exactly: the float load's weights, bit for bit
                assert isinstance(ours, Int4Linear) and ours.group_size == 32
                assert torch.equal(ours.dequantized_weight(), ref)
            else:                        # Q4_1 -> int8 is round-to-nearest per row of the dequantized weight
                assert isinstance(ours, Int8Linear)
                q, scale = quantize_int8(ref)
                assert torch.equal(ours.qweight, q) and torch.equal(ours.scales, scale)
    if quantization == "int4":
        ours = [logits for _, logits in stepped_logits(engine, [SMOL_PROMPT], steps=4)]
        ref = [logits for _, logits in stepped_logits(smol_float, [SMOL_PROMPT], steps=4)]
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert engine.generate([SMOL_PROMPT], greedy) == smol_float.generate([SMOL_PROMPT], greedy)


def test_gptq_qwen2_with_qkv_bias(tmp_path):
    """The biases of quantized linears are buffers of Int4Linear: the fused qkv bias shards fill them too."""
    from tests.engine.test_family_qwen import write_tiny_qwen
    quantized, reference = write_packed_pair(tmp_path, "gptq", write_plain=lambda p: write_tiny_qwen(p, "qwen2"))
    engine = make_engine(quantized)
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.bias is not None
    ref = hf_model(reference)
    assert_logits_match(engine, ref, steps=4)
