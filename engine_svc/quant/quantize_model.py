"""Replaces the decoder layers' nn.Linear modules of a loaded model by quantized ones (RTN from the loaded
weights). Embeddings and lm_head keep the model dtype: they are a small share of the bytes of large models and the
most sensitive to rounding."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine_svc.distributed.layers import RowParallel
from engine_svc.quant.fp8_support import require_fp8_support
from engine_svc.quant.fp8_linear import Fp8Linear
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from engine_svc.quant.row_parallel import quantize_row_parallel

# Attribute names of the decoder linears: Llama-shaped families (Llama, Mistral, Qwen2, Qwen3) and Falcon.
DECODER_LINEARS = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                             "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})
METHODS = ("int8", "int4", "fp8")
MIN_GROUP_SIZE = 32


def fitting_group_size(in_features: int, group_size: int) -> int:
    """group_size if it divides in_features, else the largest of its halvings (down to MIN_GROUP_SIZE) that does:
    e.g. SmolLM2's 576 features take groups of 64 when 128 is asked for."""
    g = group_size
    while in_features % g:
        if g // 2 < MIN_GROUP_SIZE or g % 2:
            raise ValueError(f"no int4 group size from {group_size} down to {MIN_GROUP_SIZE} divides "
                             f"{in_features} input features")
        g //= 2
    return g


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                    names: frozenset[str] = DECODER_LINEARS) -> list[str]:
    """Sets each nn.Linear whose attribute name is in `names` to make(qualified_name, linear), one module at a time;
    returns the qualified names replaced, in module order. Only the name list is held across the loop, so a float
    weight is freed as soon as its replacement is in (when nothing else refers to it). Works on the meta device too,
    e.g. to build empty quantized modules before a quantized checkpoint is loaded into them."""
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rpartition(".")[2] in names]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, make(name, getattr(parent, attr)))
    return targets


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 128, use_triton: bool = False,
                   emulate_fp8: bool = False) -> list[str]:
    """Quantizes the decoder linears in place with `method` (int8, int4 with `group_size` or, for a layer it does
    not divide, fitting_group_size, fp8); returns their names. A tensor-parallel shard is quantized as its part of
    the whole layer (engine_svc.quant.row_parallel).
    use_triton: int8/int4 modules run the Triton kernels. emulate_fp8: fp8 modules run the pure-torch emulation
    (any device); otherwise fp8 needs a CUDA device of compute capability >= 8.9 (ValueError before any change)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; supported: {', '.join(METHODS)}")
    if method == "fp8" and not emulate_fp8:
        device = next(model.parameters()).device
        require_fp8_support(device)
    makers: dict[str, Callable[[str, nn.Linear], nn.Module]] = {
        "int8": lambda _, linear: Int8Linear.from_linear(linear, use_triton),
        "int4": lambda _, linear: Int4Linear.from_linear(linear, fitting_group_size(linear.in_features, group_size),
                                                         use_triton),
        "fp8": lambda _, linear: Fp8Linear.from_linear(linear, emulate_fp8),
    }

    def make(name: str, linear: nn.Linear) -> nn.Module:
        if isinstance(linear, RowParallel):   # a tensor-parallel shard of the layer's input columns
            group = fitting_group_size(linear.full_in_features, group_size)
            return quantize_row_parallel(linear, method, group, use_triton, emulate_fp8)
        return makers[method](name, linear)

    replaced = replace_linears(model, make)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no decoder linear layers to quantize (looked for "
                         f"{', '.join(sorted(DECODER_LINEARS))})")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # hand the float weights' memory back, so the KV plan sees it free
    return replaced

