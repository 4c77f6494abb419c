"""GGUF weights for a model whose linears are int4 / int8 (--quantization int4 / int8): the quantized linears get
their buffers (`<layer>.qweight`, `.scales` and, for int4, `.offsets`) straight from the file's blocks where the
block type maps onto the format (Q4_0 / Q4_1 -> int4 exactly, Q8_0 -> int8 per row), one tensor at a time; a
linear stored in another type is dequantized alone and quantized round-to-nearest (int4 with the same group of 32
as the Q4 blocks). Everything else (embeddings, norms, an unquantized lm_head) is dequantized as in gguf_loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import ReaderTensor

from engine_svc.loader.gguf_loader import (dequantized_tensor, gguf_model_config, hf_name, open_gguf,
                                           rotary_heads, unpermute_rotary)
from engine_svc.loader.hf_loader import _Sized
from engine_svc.model_config import ModelConfig
from engine_svc.quant.gguf_quant import GGUF_BLOCK, INT4_GGUF_TYPES, INT8_GGUF_TYPES, q4_to_int4, q8_0_to_int8
from engine_svc.quant.int4_format import quantize_int4
from engine_svc.quant.int8_format import quantize_int8

GGUF_INT4_GROUP = GGUF_BLOCK
QUANTIZED_BUFFERS = {"int4": ("qweight", "scales", "offsets"), "int8": ("qweight", "scales")}


def iter_gguf_quantized_weights(path: Path, quantization: str, is_quantized: Callable[[str], bool]) -> _Sized:
    """is_quantized(layer name in HF naming, e.g. model.layers.0.self_attn.q_proj): whether the model holds that
    linear as int4 / int8 (so its weight must arrive as the format's buffers)."""
    if quantization not in QUANTIZED_BUFFERS:
        raise ValueError(f"GGUF weights map onto int4 or int8, not {quantization!r}")
    reader = open_gguf(path)
    cfg = gguf_model_config(path)

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_name(t.name)
            layer, _, leaf = name.rpartition(".")
            if leaf != "weight" or not is_quantized(layer):
                yield name, dequantized_tensor(t, name, cfg)
                continue
            for buffer, tensor in zip(QUANTIZED_BUFFERS[quantization], _quantized(t, name, cfg, quantization)):
                yield f"{layer}.{buffer}", tensor

    def yields(t: ReaderTensor) -> int:
        layer, _, leaf = hf_name(t.name).rpartition(".")
        return len(QUANTIZED_BUFFERS[quantization]) if leaf == "weight" and is_quantized(layer) else 1

    return _Sized(gen(), sum(yields(t) for t in reader.tensors))


def _quantized(t: ReaderTensor, name: str, cfg: ModelConfig, quantization: str) -> tuple[torch.Tensor, ...]:
    raw = np.asarray(t.data)
    if quantization == "int4" and t.tensor_type in INT4_GGUF_TYPES:
        out = q4_to_int4(raw, t.tensor_type)
    elif quantization == "int8" and t.tensor_type in INT8_GGUF_TYPES:
        out = q8_0_to_int8(raw)
    else:   # dequantized_tensor has already un-permuted the rows
        w = dequantized_tensor(t, name, cfg)
        return quantize_int4(w, GGUF_INT4_GROUP) if quantization == "int4" else quantize_int8(w)
    heads = rotary_heads(name, cfg)
    # llama.cpp permuted the output rows: every per-row tensor of the layer moves with them
    return tuple(unpermute_rotary(x, heads).contiguous() for x in out) if heads else out
