"""Fp8Linear: W8A8 with e4m3 weights (one float32 scale per output channel) and activations quantized per token
at run time (scale = absmax / 448), multiplied on the fp8 tensor cores by torch._scaled_mm with row-wise scales
(CUDA, compute capability >= 8.9). emulate=True runs the same arithmetic in pure torch (quantize the activations
to e4m3, dequantize both operands, matmul in fp32): the reference, and the only path off those GPUs.

On the GPU the activations are quantized by one Triton kernel (kernels.fp8_act_quant). Decode rows (M <= 4) then
take the weight-streaming GEMV of kernels.int8_matmul over the same e4m3 operands (fp32 products and sums, then
both scales): at M = 1 cuBLAS's fp8 GEMM, which needs M padded to 16, measured no faster than bf16 on an H100 for
two of Llama-3-8B's four projection shapes."""
from __future__ import annotations

import torch
from torch import nn

from engine_svc.kernels.fp8_numerics import E4M3, dequantize_fp8, quantize_fp8_rows

GEMV_MAX_ROWS = 4         # decode rows: the Triton GEMV instead of _scaled_mm
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
    def from_linear(cls, linear: nn.Linear, emulate: bool = False,
                    row_absmax: torch.Tensor | None = None) -> "Fp8Linear":
        """row_absmax: see quantize_fp8_rows (a row-parallel shard's rows are scaled by the whole rows' maxima)."""
        w = linear.weight
        if not emulate:
            from engine_svc.quant.fp8_support import require_fp8_support
            require_fp8_support(w.device)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, emulate)
        module.qweight, scales = quantize_fp8_rows(w, row_absmax)
        module.scales = scales.squeeze(-1)   # one per output channel: [N]
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._emulated(x2, bias) if self.emulate else self._scaled_mm(x2, bias)
        return y.view(*shape[:-1], self.out_features)

    def _emulated(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xq, x_scale = quantize_fp8_rows(x2)
        y = dequantize_fp8(xq, x_scale) @ dequantize_fp8(self.qweight, self.scales).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)

    def _scaled_mm(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from engine_svc.kernels.fp8_act_quant import quantize_rows_fp8
        m = x2.shape[0]
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        if m <= GEMV_MAX_ROWS:
            from engine_svc.kernels.int8_matmul import int8_gemv
            xq, x_scale = quantize_rows_fp8(x2)
            return int8_gemv(xq, self.qweight, self.scales, row_scales=x_scale, bias=bias, out_dtype=x2.dtype)
        # zero padding rows (scale floor, zero output) up to _scaled_mm's multiple, sliced off below
        xq, x_scale = quantize_rows_fp8(x2, m + (-m % SCALED_MM_MULTIPLE))
        # Row-wise scaling produces bf16 only; qweight.t() is the column-major operand _scaled_mm wants.
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scales.view(1, -1),
                             out_dtype=torch.bfloat16)[:m]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"emulate={self.emulate}")
