"""Fp8Linear: W8A8 with e4m3 weights (one float32 scale per output channel) and activations quantized per token
at run time (scale = absmax / 448), multiplied on the fp8 tensor cores by torch._scaled_mm with row-wise scales
(CUDA, compute capability >= 8.9). emulate=True runs the same arithmetic in pure torch (quantize the activations
to e4m3, dequantize both operands, matmul in fp32): the reference, and the only path off those GPUs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.quant.fp8_format import E4M3, dequantize_fp8, quantize_fp8, quantize_fp8_rows

SCALED_MM_MULTIPLE = 16   # torch._scaled_mm wants every dimension a multiple of 16: K and N are checked, M padded


class Fp8Linear(nn.Module):
    """Buffers: qweight float8_e4m3fn [N, K], scales float32 [N], bias [N] (model dtype) when bias=True."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, emulate: bool = False) -> None:
        super().__init__()
        if not emulate and (in_features % SCALED_MM_MULTIPLE or out_features % SCALED_MM_MULTIPLE):
            raise ValueError(f"fp8 (torch._scaled_mm) needs input and output features that are multiples of "
                             f"{SCALED_MM_MULTIPLE}, got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.emulate = emulate
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, emulate: bool = False) -> "Fp8Linear":
        w = linear.weight
        if not emulate:
            from engine_svc.quant.fp8_format import require_fp8_support
            require_fp8_support(w.device)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, emulate)
        module.qweight, module.scales = quantize_fp8(w)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._emulated(x2) if self.emulate else self._scaled_mm(x2)
        return y.view(*shape[:-1], self.out_features)

    def _emulated(self, x2: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_fp8_rows(x2)
        y = dequantize_fp8(xq, x_scale) @ dequantize_fp8(self.qweight, self.scales).t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x2.dtype)

    def _scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        pad = -m % SCALED_MM_MULTIPLE
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))     # zero rows: scale floor, zero output, sliced off below
        xq, x_scale = quantize_fp8_rows(x2)
        # Row-wise scaling produces bf16 only; qweight.t() is the column-major operand _scaled_mm wants.
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scales.view(1, -1),
                             out_dtype=torch.bfloat16)[:m]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"emulate={self.emulate}")
