"""The loader-side streams: AWQ / GPTQ checkpoint tensors regrouped per layer and converted; GGUF tensors handed
out as int4 / int8 buffers, in HF's row order (the q/k un-permutation applied to every per-row tensor)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_svc.loader.gguf_loader import gguf_model_config, iter_gguf_weights, open_gguf
from engine_svc.loader.gguf_quantized import iter_gguf_quantized_weights
from engine_svc.quant.checkpoint_config import PackedQuantConfig
from engine_svc.quant.int4_format import dequantize_int4
from engine_svc.quant.int8_format import dequantize_int8
from engine_svc.quant.packed_checkpoint import convert_packed_weights
from tests.quant.packing_spec import awq_pack_along_columns, gptq_pack_columns, gptq_pack_rows, random_layer


def test_awq_stream_converts_each_layer_and_passes_the_rest():
    q, zeros, scales, ref = random_layer(16, 64, 32, seed=0)
    s = torch.from_numpy(scales.T.astype(np.float16))
    norm = torch.ones(64)
    weights = [("model.norm.weight", norm),
               ("model.layers.0.mlp.up_proj.qweight", awq_pack_along_columns(q.T)),
               ("model.layers.0.mlp.up_proj.qzeros", awq_pack_along_columns(zeros.T)),
               ("model.layers.0.mlp.up_proj.scales", s)]
    out = dict(convert_packed_weights(weights, PackedQuantConfig("awq", 4, 32)))
    assert set(out) == {"model.norm.weight", "model.layers.0.mlp.up_proj.qweight",
                        "model.layers.0.mlp.up_proj.scales", "model.layers.0.mlp.up_proj.offsets"}
    assert out["model.norm.weight"] is norm
    layer = [out[f"model.layers.0.mlp.up_proj.{leaf}"] for leaf in ("qweight", "scales", "offsets")]
    assert torch.equal(dequantize_int4(*layer, 32), ref)


def test_gptq_stream_without_g_idx_and_a_missing_part():
    q, zeros, scales, ref = random_layer(8, 64, 64, seed=1, zero_low=1)
    parts = {"qweight": gptq_pack_rows(q.T), "qzeros": gptq_pack_columns(zeros.T - 1),
             "scales": torch.from_numpy(scales.T.astype(np.float16))}
    cfg = PackedQuantConfig("gptq", 4, -1, zero_minus_one=True)
    out = dict(convert_packed_weights([(f"l.{k}", v) for k, v in parts.items()], cfg))
    assert torch.equal(dequantize_int4(out["l.qweight"], out["l.scales"], out["l.offsets"], 64), ref)
    with pytest.raises(ValueError, match=r"'l' lacks \['qzeros'\]"):
        list(convert_packed_weights([("l.qweight", parts["qweight"]), ("l.scales", parts["scales"])], cfg))


def test_awq_stream_names_the_layer_in_errors():
    q, zeros, scales, _ = random_layer(8, 64, 32, seed=2)
    weights = [("x.qweight", awq_pack_along_columns(q.T)), ("x.qzeros", awq_pack_along_columns(zeros.T)),
               ("x.scales", torch.from_numpy(scales.T.astype(np.float16)))]
    with pytest.raises(ValueError, match="layer 'x'.*does not divide"):
        list(convert_packed_weights(weights, PackedQuantConfig("awq", 4, 48)))


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_gguf_stream_matches_the_dequantized_load(smollm2_gguf, quantization):
    """Layers 0 of the real Q4_1 file: the int4 buffers are the dequantized weights exactly; int8 (RTN from Q4_1
    here) within half a step of its row scale. q_proj/k_proj check the row un-permutation."""
    wanted = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    wanted |= {"model.layers.0.mlp.down_proj"}
    reader, cfg = open_gguf(smollm2_gguf), gguf_model_config(smollm2_gguf)
    assert cfg.num_heads != cfg.num_kv_heads      # q and k un-permute with different head counts
    ref = {}
    for name, w in iter_gguf_weights(smollm2_gguf):
        if name.rpartition(".")[0] in wanted:
            ref[name.rpartition(".")[0]] = w
        if len(ref) == len(wanted):
            break
    got: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_gguf_quantized_weights(smollm2_gguf, quantization, lambda layer: layer in wanted):
        layer, _, leaf = name.rpartition(".")
        if layer in wanted:
            got.setdefault(layer, {})[leaf] = t
        if len(got) == len(wanted) and all(len(v) == (3 if quantization == "int4" else 2) for v in got.values()):
            break
    assert len(reader.tensors) > 0 and set(got) == wanted
    for layer, bufs in got.items():
        if quantization == "int4":
            assert torch.equal(dequantize_int4(bufs["qweight"], bufs["scales"], bufs["offsets"], 32), ref[layer])
        else:
            err = (dequantize_int8(bufs["qweight"], bufs["scales"]) - ref[layer]).abs().amax(dim=1)
            assert torch.all(err <= bufs["scales"] / 2 * (1 + 1e-5))
