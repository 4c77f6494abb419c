"""Int4Linear: nn.Linear with an int4 weight-only weight (engine_svc.quant.int4_format: group-wise, offset form,
two nibbles per byte along K); activations and outputs stay in the model dtype. The AWQ/GPTQ/GGUF converters
produce exactly its three buffers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.quant.int4_format import dequantize_int4, quantize_int4

TRITON_GROUP_MULTIPLE = 32    # the Triton kernels walk K in sub-groups of at least 32 (engine_svc.kernels.int4_matmul)


class Int4Linear(nn.Module):
    """Buffers: qweight uint8 [N, K // 2], scales and offsets [N, K // G] (model dtype), bias [N] when bias=True.

    use_triton: the fused Triton kernel (engine_svc.kernels.int4_matmul); otherwise the torch reference,
    dequantize to the activation dtype then F.linear (any device).

    use_shuffled_gemv(), once the weights are in (engine_svc.quant.int4_gemv_layout decides at load): calls of at
    most GEMV_MAX_ROWS rows then run the GEMV over a pre-shuffled copy (engine_svc.kernels.int4_gemv_shuffled,
    non-persistent buffers gemv_codes and gemv_scale_offset); larger calls and the torch path keep the plain
    buffers."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 use_triton: bool = False) -> None:
        super().__init__()
        if group_size < 2 or group_size % 2 or in_features % group_size:
            raise ValueError(f"int4 needs an even group size dividing the input dimension; got group size "
                             f"{group_size} for {in_features} input features")
        if use_triton and group_size % TRITON_GROUP_MULTIPLE:
            raise ValueError(f"the int4 Triton kernels need a group size that is a multiple of "
                             f"{TRITON_GROUP_MULTIPLE}, got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.use_triton = use_triton
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("gemv_codes", None, persistent=False)
        self.register_buffer("gemv_scale_offset", None, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, use_triton: bool = False) -> "Int4Linear":
        """Round to nearest with each group's min and max (quantize_int4); scales and offsets are rounded to the
        weight's dtype, which then defines the quantized weight."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, w.dtype,
                     w.device, use_triton)
        qweight, scales, offsets = quantize_int4(w, group_size)
        module.qweight = qweight
        module.scales.copy_(scales)
        module.offsets.copy_(offsets)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.offsets, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    @torch.no_grad()
    def use_shuffled_gemv(self) -> None:
        """Builds the shuffled copy of the loaded weight that the GEMV-sized calls read from now on."""
        if not self.use_triton:
            raise ValueError("the shuffled int4 GEMV layout is for the Triton kernels (use_triton=True)")
        from engine_svc.kernels.int4_gemv_shuffled import shuffle_int4_for_gemv
        shuffled = shuffle_int4_for_gemv(self.qweight, self.scales, self.offsets, self.group_size)
        self.gemv_codes, self.gemv_scale_offset = shuffled.codes, shuffled.scale_offset

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.use_triton:
            from engine_svc.kernels.int4_matmul import GEMV_MAX_ROWS, int4_matmul
            if self.gemv_codes is not None and x.numel() <= GEMV_MAX_ROWS * self.in_features:
                from engine_svc.kernels.int4_gemv_shuffled import ShuffledInt4, int4_gemv_shuffled
                return int4_gemv_shuffled(x, ShuffledInt4(self.gemv_codes, self.gemv_scale_offset,
                                                          self.out_features, self.in_features, self.group_size), bias)
            return int4_matmul(x, self.qweight, self.scales, self.offsets, self.group_size, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, triton={self.use_triton}, "
                f"gemv_layout={'plain' if self.gemv_codes is None else 'shuffled'}")
