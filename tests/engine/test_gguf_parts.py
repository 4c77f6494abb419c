"""GGUF tensors read by parts (engine_svc.loader.gguf_lazy), as tensor-parallel ranks read them: rows and
block-aligned columns equal the whole dequantized tensor's, narrowed, and only the part's bytes are dequantized; a
cut inside a block falls back to the whole rows. On a tiny GGUF (quantized projections, float32 embeddings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine_svc.loader import gguf_lazy
from engine_svc.loader.gguf_loader import iter_gguf_weights
from engine_svc.loader.gguf_lazy import GGUFTensorPart
from tests.quant.tiny_gguf import write_tiny_gguf

PARTS = {   # HF name -> parts a rank reads: rows (head-aligned for q/k), or block-aligned columns
    "model.layers.0.self_attn.q_proj.weight": [slice(0, 16), slice(32, 64)],
    "model.layers.0.self_attn.k_proj.weight": [slice(16, 32)],
    "model.layers.1.mlp.gate_proj.weight": [slice(40, 96)],
    "model.layers.0.self_attn.o_proj.weight": [(slice(None), slice(32, 64))],
    "model.layers.1.mlp.down_proj.weight": [(slice(None), slice(0, 64)), (slice(None), slice(64, 128))],
    "model.embed_tokens.weight": [slice(160, 320)],
    "model.norm.weight": [slice(None)],
}


@pytest.fixture(scope="module", params=[T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def tensors(request, tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf-parts") / "tiny.gguf", request.param, seed=2)
    whole = dict(iter_gguf_weights(path))
    lazy = dict(iter_gguf_weights(path, lazy=True))
    return whole, lazy


def test_parts_equal_the_whole_tensor_narrowed(tensors):
    whole, lazy = tensors
    for name, parts in PARTS.items():
        assert isinstance(lazy[name], GGUFTensorPart) and lazy[name].get_shape() == tuple(whole[name].shape)
        for part in parts:
            assert torch.equal(lazy[name][part], whole[name][part]), (name, part)


def test_only_the_part_is_dequantized(tensors, monkeypatch):
    _, lazy = tensors
    seen: list[tuple[int, ...]] = []
    real = gguf_lazy.dequantize
    monkeypatch.setattr(gguf_lazy, "dequantize", lambda raw, qtype: (seen.append(raw.shape), real(raw, qtype))[1])
    lazy["model.layers.0.self_attn.q_proj.weight"][32:64]
    lazy["model.layers.1.mlp.down_proj.weight"][:, 64:128]
    rows_bytes = np.asarray(lazy["model.layers.1.mlp.down_proj.weight"]._t.data).shape[1]
    assert seen == [(32, seen[0][1]), (64, rows_bytes // 2)]   # 32 of q's 64 rows; half of down's row bytes


def test_a_cut_inside_a_block_reads_the_whole_rows(tensors):
    whole, lazy = tensors
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(lazy[name][:, 16:48], whole[name][:, 16:48])


@pytest.mark.parametrize("qtype, quantization", [(T.Q4_0, "int4"), (T.Q8_0, "int8"), (T.Q8_0, "int4")],
                         ids=["q4_0-int4", "q8_0-int8", "q8_0-int4-rtn"])
def test_quantized_buffers_by_parts_equal_the_whole_buffers_narrowed(qtype, quantization, tmp_path, monkeypatch):
    from engine_svc.loader import gguf_quantized
    from engine_svc.loader.gguf_quantized import QuantizedBufferPart, iter_gguf_quantized_weights

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, seed=2)
    decoder = lambda layer: layer.endswith("_proj")  # noqa: E731
    whole = dict(iter_gguf_quantized_weights(path, quantization, decoder))
    lazy = dict(iter_gguf_quantized_weights(path, quantization, decoder, lazy=True))
    converted: list[tuple] = []
    real = gguf_quantized._quantized
    monkeypatch.setattr(gguf_quantized, "_quantized", lambda *a: (converted.append(a[4:]), real(*a))[1])
    by_features = {"qweight": 2, "scales": 32, "offsets": 32} if quantization == "int4" else {"qweight": 1}
    for layer, rows, features in [("layers.0.self_attn.q_proj", (16, 48), None),
                                  ("layers.1.mlp.up_proj", (64, 128), None),
                                  ("layers.0.self_attn.o_proj", None, (32, 64)),
                                  ("layers.1.mlp.down_proj", None, (0, 64))]:
        for buffer in ("qweight", "scales", "offsets")[:3 if quantization == "int4" else 2]:
            name = f"model.{layer}.{buffer}"
            part = lazy[name]
            assert isinstance(part, QuantizedBufferPart)
            if rows is not None:
                assert torch.equal(part[slice(*rows)], whole[name][slice(*rows)]), name
            elif buffer in by_features:
                cols = slice(features[0] // by_features[buffer], features[1] // by_features[buffer])
                assert torch.equal(part[:, cols], whole[name][:, cols]), name
            else:   # int8's row scales: whole
                assert torch.equal(part[:], whole[name]), name
    # Rows convert alone every time; Q4 blocks to int4 convert by columns, once per layer for its three buffers;
    # the others (a row's scale spans the row) convert whole rows.
    columns = [(None, (1, 2)), (None, (0, 2))] if qtype == T.Q4_0 else [(None, None), (None, None)]
    assert converted[:1] == [((16, 48), None)] and converted[-2:] == columns
