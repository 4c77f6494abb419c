"""Int8Linear: nn.Linear with an int8 weight-only weight (engine_svc.quant.int8_format: per output channel,
symmetric); activations and outputs stay in the model dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.quant.int8_format import dequantize_int8, quantize_int8


class Int8Linear(nn.Module):
    """Buffers: qweight int8 [N, K], scales float32 [N], bias [N] (model dtype) when bias=True.

    use_triton: the fused Triton kernel (engine_svc.kernels.int8_matmul); otherwise the torch reference,
    dequantize to the activation dtype then F.linear (any device)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, use_triton: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_triton = use_triton
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, use_triton: bool = False,
                    row_absmax: torch.Tensor | None = None) -> "Int8Linear":
        """row_absmax: see quantize_int8 (a row-parallel shard's rows are scaled by the whole rows' maxima)."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device,
                     use_triton)
        module.qweight, module.scales = quantize_int8(w, row_absmax)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.use_triton:
            from engine_svc.kernels.int8_matmul import int8_matmul
            return int8_matmul(x, self.qweight, self.scales, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"triton={self.use_triton}")
