"""Which checkpoints load straight into int4 / int8 linears, and the weight stream that fills them:
- an AWQ or GPTQ HF checkpoint (detected from its quantization_config) -> int4 with the checkpoint's group size;
- a GGUF file with --quantization int4 (int8) -> int4 with group 32 from Q4_0 / Q4_1 blocks (int8 from Q8_0).
The model is built with empty quantized linears and filled by its load_weights; no layer passes through a
full-precision weight on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from engine_svc.model_config import ModelConfig
from engine_svc.quant.checkpoint_config import PackedQuantConfig

GGUF_INT4_GROUP = 32


@dataclass(frozen=True)
class QuantizedLoad:
    kind: str                               # "int4" | "int8": the linears' format
    group_size: int                         # int4: the group along the inputs, -1 = each layer's whole input
    packed: PackedQuantConfig | None = None  # set for AWQ / GPTQ checkpoints

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def plan_quantized_load(path: Path, cfg: ModelConfig, quantization: str, load_format: str) -> QuantizedLoad | None:
    """None: the model loads with ordinary linears (any other --quantization is applied after loading)."""
    if load_format == "dummy":
        return None
    packed = cfg.checkpoint_quantization
    if packed is not None:
        if quantization not in ("none", "int4"):
            raise ValueError(f"{path} is a 4-bit {packed.method.upper()} checkpoint; --quantization {quantization} "
                             f"cannot apply to it (leave it at none)")
        return QuantizedLoad("int4", packed.group_size, packed)
    if path.suffix == ".gguf" and quantization in ("int4", "int8"):
        return QuantizedLoad(quantization, GGUF_INT4_GROUP)
    return None


def build_quantized_linears(model: nn.Module, plan: QuantizedLoad, dtype: torch.dtype, use_triton: bool,
                            device: torch.device | str = "meta") -> list[str]:
    """Swaps the decoder linears (quantize_model.DECODER_LINEARS; not lm_head) for empty Int4Linear / Int8Linear
    modules on `device` (meta before the model is materialised), for quantized_weights to fill."""
    from engine_svc.distributed.layers import RowParallel
    from engine_svc.quant.int4_linear import Int4Linear
    from engine_svc.quant.int8_linear import Int8Linear
    from engine_svc.quant.quantize_model import replace_linears
    from engine_svc.quant.row_parallel import empty_row_parallel

    def make(_: str, linear: nn.Linear) -> nn.Module:
        if isinstance(linear, RowParallel):   # a tensor-parallel shard of the layer's input columns
            return empty_row_parallel(linear, plan.kind, plan.group_for(linear.full_in_features), dtype, device,
                                      use_triton)
        bias = linear.bias is not None
        if plan.kind == "int8":
            return Int8Linear(linear.in_features, linear.out_features, bias, dtype, device, use_triton)
        return Int4Linear(linear.in_features, linear.out_features, plan.group_for(linear.in_features), bias, dtype,
                          device, use_triton)

    replaced = replace_linears(model, make)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no decoder linears to hold {plan.kind} weights")
    return replaced


def quantized_weights(path: Path, plan: QuantizedLoad, model: nn.Module,
                      lazy: bool = False) -> Iterable[tuple[str, torch.Tensor]]:
    """lazy: a GGUF's tensors are read by parts (tensor-parallel ranks). An AWQ / GPTQ layer is converted whole
    (its packing interleaves the input features of eight rows, and GPTQ's act-order g_idx may permute them) and
    each rank keeps its part."""
    if plan.packed is not None:
        from engine_svc.loader.hf_loader import iter_safetensors
        from engine_svc.quant.packed_checkpoint import convert_packed_weights
        return convert_packed_weights(iter_safetensors(path), plan.packed)
    from engine_svc.loader.gguf_quantized import iter_gguf_quantized_weights
    from engine_svc.models.llama import fused_module_name
    quantized = {name.rpartition(".")[0] for name, _ in model.named_buffers() if name.endswith(".qweight")}
    return iter_gguf_quantized_weights(path, plan.kind, lambda layer: fused_module_name(layer) in quantized, lazy)

