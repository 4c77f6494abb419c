"""quantize_model on a tiny random Llama: which modules it replaces, that the engine then computes exactly the
quantized model (transformers with the dequantized weights is the reference), how far the quantized logits move
from the float model's, the memory plan's weight bytes, and greedy generation with int8 and int4."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from engine_svc.quant.quantize_model import fitting_group_size, quantize_model, replace_linears
from tests.engine.family_checks import PROMPTS, assert_greedy_matches, hf_model, make_engine, stepped_logits
from tests.engine.tiny_models import write_tiny_llama

HIDDEN, INTER, LAYERS, VOCAB = 64, 128, 2, 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-quant"), seed=11)


def dequantized_hf(checkpoint, engine: Engine):
    """transformers' Llama with each decoder projection replaced by the engine's dequantized weight (the fused
    qkv_proj / gate_up_proj rows split back into q, k, v / gate, up)."""
    hf = hf_model(checkpoint)
    model = engine.runner.model
    sizes = {"qkv_proj": model.fused_shard_sizes("qkv_proj"), "gate_up_proj": model.fused_shard_sizes("gate_up_proj")}
    hf_names = {"qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
                "o_proj": ["self_attn.o_proj"], "down_proj": ["mlp.down_proj"]}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for ours, module in (("qkv_proj", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                                 ("gate_up_proj", layer.mlp.gate_up_proj), ("down_proj", layer.mlp.down_proj)):
                w = module.dequantized_weight()
                parts = w.split(sizes[ours]) if ours in sizes else [w]
                for name, part in zip(hf_names[ours], parts):
                    hf.get_submodule(f"model.layers.{i}.{name}").weight.copy_(part)
    return hf


def test_replaces_exactly_the_decoder_linears(checkpoint):
    engine = make_engine(checkpoint)
    model = engine.runner.model
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    names = quantize_model(model, "int4", group_size=128)
    assert names == [f"model.layers.{i}.{n}" for i in range(LAYERS)
                     for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in names)
    # 64 input features do not take groups of 128: the largest fitting halving is used.
    assert model.model.layers[0].self_attn.qkv_proj.group_size == 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)


def test_replace_linears_builds_empty_modules_on_meta():
    """The AWQ/GPTQ loader's use: empty Int4Linear modules of the right shapes, nothing materialised."""
    from engine_svc.attention import get_backend
    from engine_svc.model_config import ModelConfig
    from engine_svc.models import model_class
    cfg = ModelConfig.from_hf_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
                                        intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64), name="tiny")
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, get_backend("torch", "cpu"))
        names = replace_linears(model, lambda _, lin: Int4Linear(lin.in_features, lin.out_features, 32,
                                                                  lin.bias is not None, torch.bfloat16))
    assert len(names) == 4 * LAYERS
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert qkv.qweight.is_meta and qkv.qweight.shape == (HIDDEN + 2 * 32, HIDDEN // 2)
    assert qkv.scales.shape == (HIDDEN + 2 * 32, HIDDEN // 32) and qkv.scales.dtype == torch.bfloat16


def test_errors():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")
    with pytest.raises(ValueError, match="no decoder linear layers"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int8")
    with pytest.raises(ValueError, match="no int4 group size from 128 down to 32 divides 48"):
        fitting_group_size(48, 128)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_computes_the_quantized_model(checkpoint, method):
    """Every prefill and paged-decode step's logits equal transformers' with the dequantized weights, at the
    fp32 tolerance of the unquantized family checks: the engine adds no error beyond the format's."""
    engine = make_engine(checkpoint, quantization=method)
    ref = dequantized_hf(checkpoint, engine)
    with torch.no_grad():
        for seq, logits in stepped_logits(engine, PROMPTS, steps=4):
            torch.testing.assert_close(logits, ref(torch.tensor([seq])).logits[0, -1], rtol=1e-4, atol=1e-4)


# Relative L2 distance of quantized from float logits. RTN's error per weight is uniform within half a step, about
# step / sqrt(12) RMS: int8 (step = rowmax / 127) moves these N(0, 0.15) weights by 0.65% (relative L2), int4 RTN
# (step = group range / 15) by 9-10%. This random 2-layer model amplifies weight error into the logits by up to ~5x:
# measured at most 4.6% (int8) and 34% (int4) over these steps. The bounds are 1.5x those, far below the distance
# between the logits of unrelated prompts (~120%), so a layer computing the wrong thing cannot pass.
LOGIT_DISTANCE_BOUND = {"int8": 0.07, "int4": 0.5}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_float_model(checkpoint, method):
    hf = hf_model(checkpoint)
    engine = make_engine(checkpoint, quantization=method)
    with torch.no_grad():
        for seq, logits in stepped_logits(engine, PROMPTS, steps=2):
            expected = hf(torch.tensor([seq])).logits[0, -1]
            distance = ((logits - expected).norm() / expected.norm()).item()
            assert distance < LOGIT_DISTANCE_BOUND[method], (seq, distance)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_generates_greedy_like_the_dequantized_reference(checkpoint, method):
    engine = make_engine(checkpoint, quantization=method)
    outs = assert_greedy_matches(engine, dequantized_hf(checkpoint, engine), n=8)
    assert all(len(o) == 8 for o in outs)


def test_memory_plan_counts_quantized_weights(checkpoint):
    """int8: N*K one-byte weights and N fp32 scales per decoder linear; everything else fp32 parameters."""
    linears = [(HIDDEN + 2 * 32, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]   # (N, K)
    float_params = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN                  # embed, lm_head, norms
    expected = 4 * float_params + LAYERS * sum(n * k + 4 * n for n, k in linears)
    engine = make_engine(checkpoint, quantization="int8")
    assert engine.runner.plan.weights_bytes == expected
    assert make_engine(checkpoint).runner.plan.weights_bytes == 4 * (float_params
                                                                      + LAYERS * sum(n * k for n, k in linears))
    assert isinstance(engine.runner.model.model.layers[0].mlp.down_proj, Int8Linear)


def test_fp8_on_the_cpu_fails_at_start(checkpoint):
    with pytest.raises(ValueError, match=r"fp8 quantization .* compute capability >= 8\.9 .* the device is cpu"):
        Engine(EngineConfig(model=str(checkpoint), device="cpu", quantization="fp8", num_kv_blocks=8))


def test_triton_backend_selects_the_kernels(checkpoint):
    for method in ("int8", "int4"):
        model = make_engine(checkpoint, quantization=method, attention_backend="triton").runner.model
        assert all(m.use_triton for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        assert not any(m.use_triton for m in make_engine(checkpoint, quantization=method).runner.model.modules()
                       if isinstance(m, (Int8Linear, Int4Linear)))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_with_triton_kernels_generates_like_the_torch_path(checkpoint, method):
    """The quantized linears on the Triton kernels (interpreted on the CPU; torch attention, to keep it quick):
    the same greedy tokens as the torch reference path."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = make_engine(checkpoint, quantization=method).generate(PROMPTS, params)
    engine = make_engine(checkpoint)
    quantize_model(engine.runner.model, method, use_triton=True)
    assert engine.generate(PROMPTS, params) == expected
