"""GGUF weights for a model whose linears are int4 / int8 (--quantization int4 / int8): the quantized linears get
their buffers (`<layer>.qweight`, `.scales` and, for int4, `.offsets`) straight from the file's blocks where the
block type maps onto the format (Q4_0 / Q4_1 -> int4 exactly, Q8_0 -> int8 per row), one tensor at a time; a
linear stored in another type is dequantized alone and quantized round-to-nearest (int4 with the same group of 32
as the Q4 blocks). Everything else (embeddings, norms, an unquantized lm_head) is dequantized as in gguf_loader.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import ReaderTensor

from engine_svc.loader.gguf_lazy import GGUFTensorPart
from engine_svc.loader.gguf_loader import (dequantized_tensor, gguf_model_config, hf_name, open_gguf,
                                           rotary_heads, unpermute_rotary)
from engine_svc.loader.hf_loader import _Sized
from engine_svc.model_config import ModelConfig
from engine_svc.quant.gguf_quant import GGUF_BLOCK, INT4_GGUF_TYPES, INT8_GGUF_TYPES, q4_to_int4, q8_0_to_int8
from engine_svc.quant.int4_format import quantize_int4
from engine_svc.quant.int8_format import quantize_int8

GGUF_INT4_GROUP = GGUF_BLOCK
QUANTIZED_BUFFERS = {"int4": ("qweight", "scales", "offsets"), "int8": ("qweight", "scales")}


def iter_gguf_quantized_weights(path: Path, quantization: str, is_quantized: Callable[[str], bool],
                                lazy: bool = False) -> _Sized:
    """is_quantized(layer name in HF naming, e.g. model.layers.0.self_attn.q_proj): whether the model holds that
    linear as int4 / int8 (so its weight must arrive as the format's buffers). lazy: yield tensors read by parts
    (tensor-parallel ranks; GGUFTensorPart, QuantizedBufferPart) instead of whole ones."""
    if quantization not in QUANTIZED_BUFFERS:
        raise ValueError(f"GGUF weights map onto int4 or int8, not {quantization!r}")
    reader = open_gguf(path)
    cfg = gguf_model_config(path)

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_name(t.name)
            layer, _, leaf = name.rpartition(".")
            if leaf != "weight" or not is_quantized(layer):
                yield name, GGUFTensorPart(t, name, cfg) if lazy else dequantized_tensor(t, name, cfg)
                continue
            if lazy:
                source = QuantizedParts(t, name, cfg, quantization)
                for i, buffer in enumerate(QUANTIZED_BUFFERS[quantization]):
                    yield f"{layer}.{buffer}", QuantizedBufferPart(source, i)
                continue
            for buffer, tensor in zip(QUANTIZED_BUFFERS[quantization], _quantized(t, name, cfg, quantization)):
                yield f"{layer}.{buffer}", tensor

    def yields(t: ReaderTensor) -> int:
        layer, _, leaf = hf_name(t.name).rpartition(".")
        return len(QUANTIZED_BUFFERS[quantization]) if leaf == "weight" and is_quantized(layer) else 1

    return _Sized(gen(), sum(yields(t) for t in reader.tensors))


def _quantized(t: ReaderTensor, name: str, cfg: ModelConfig, quantization: str,
               rows: tuple[int, int] | None = None, blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """The layer's buffers; rows: only rows [a, b) (whole heads for q / k); blocks: only each row's 32-wide blocks
    [a, b) (Q4 blocks to int4 only: every other conversion needs the whole row)."""
    raw = np.asarray(t.data)
    heads = rotary_heads(name, cfg)
    if rows is not None:
        raw = raw[rows[0]:rows[1]]
        heads = heads and heads * (rows[1] - rows[0]) // int(t.shape[1])
    if quantization == "int4" and t.tensor_type in INT4_GGUF_TYPES:
        if blocks is not None:
            block_bytes = raw.shape[1] * GGUF_BLOCK // int(t.shape[0])
            raw = raw[:, blocks[0] * block_bytes:blocks[1] * block_bytes]
        out = q4_to_int4(raw, t.tensor_type)
    elif blocks is not None:
        raise ValueError(f"{name}: only Q4 blocks to int4 convert by columns")
    elif quantization == "int8" and t.tensor_type in INT8_GGUF_TYPES:
        out = q8_0_to_int8(raw)
    else:   # dequantized rows have their q / k rows un-permuted already
        part = GGUFTensorPart(t, name, cfg)
        w = part[:] if rows is None else part[rows[0]:rows[1]]
        return quantize_int4(w, GGUF_INT4_GROUP) if quantization == "int4" else quantize_int8(w)
    # llama.cpp permuted the output rows: every per-row tensor of the layer moves with them
    return tuple(unpermute_rotary(x, heads).contiguous() for x in out) if heads else out


class QuantizedParts:
    """One GGUF linear's int4 / int8 buffers, converted by parts for a tensor-parallel rank: its rows (rows are
    independent in every conversion; q / k rows in whole heads), or its input features when they are whole 32-wide
    Q4 blocks converted to int4. Any other columns come from whole rows, narrowed: Q8_0's row scale and an RTN row
    scale span the whole row. The layer's buffers are read one after the other for the same part, so the last
    conversion is kept."""

    def __init__(self, t: ReaderTensor, name: str, cfg: ModelConfig, quantization: str) -> None:
        self.t, self.name, self.cfg, self.quantization = t, name, cfg, quantization
        self.rows, self.features = int(t.shape[1]), int(t.shape[0])
        self.by_blocks = quantization == "int4" and t.tensor_type in INT4_GGUF_TYPES
        self._last: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    def buffers(self, rows: tuple[int, int] | None = None,
                blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """rows that are not whole heads of q / k convert whole (the caller narrows)."""
        heads = rotary_heads(self.name, self.cfg)
        if rows is not None and heads and (rows[0] * heads % self.rows or rows[1] * heads % self.rows):
            rows = None
        key = (rows, blocks)
        if self._last is None or self._last[0] != key:
            self._last = key, _quantized(self.t, self.name, self.cfg, self.quantization, rows, blocks)
        return self._last[1]


# Columns of each buffer per input feature: int4 packs two a byte and has one scale / offset a group.
_COLUMNS_PER_FEATURE = {"int4": (Fraction(1, 2), Fraction(1, GGUF_INT4_GROUP), Fraction(1, GGUF_INT4_GROUP)),
                        "int8": (Fraction(1), None)}


class QuantizedBufferPart:
    """Buffer `index` of a QuantizedParts, indexed as a safetensors slice: [a:b] rows, [:, a:b] columns."""

    def __init__(self, source: QuantizedParts, index: int) -> None:
        self.source, self.index = source, index

    def __getitem__(self, index) -> torch.Tensor:
        s = self.source
        if index == slice(None):
            return s.buffers()[self.index]
        if isinstance(index, slice):
            a, b, _ = index.indices(s.rows)
            got = s.buffers(rows=(a, b))[self.index]
            return got if got.shape[0] == b - a else got[a:b]
        per_feature = _COLUMNS_PER_FEATURE[s.quantization][self.index]
        a, b, _ = index[1].indices(int(s.features * per_feature))
        f0, f1 = a / per_feature, b / per_feature
        if s.by_blocks and f0 % GGUF_BLOCK == 0 and f1 % GGUF_BLOCK == 0:
            return s.buffers(blocks=(int(f0) // GGUF_BLOCK, int(f1) // GGUF_BLOCK))[self.index]
        return s.buffers()[self.index][:, a:b]
