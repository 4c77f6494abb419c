"""The fp8 (e4m3, torch.float8_e4m3fn; Triton's tl.float8e4nv) arithmetic that every fp8 path shares: the KV cache
(one float32 scale per layer for K and one for V), W8A8 weights (one per output channel) and activations (one per
token). A value v is stored as q = e4m3(clamp(v / scale, -448, 448)), v / scale computed in float32 as the kernels
divide (correctly rounded), and the cast rounding to nearest even; it reads back as float(q) * scale.

Imports no triton: the torch paths (the CPU reference, the emulated W8A8) use it without the kernels.
"""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0            # torch.finfo(E4M3).max: e4m3's largest finite value
SCALE_FLOOR = 1e-12         # floor of a per-row scale: an all-zero row quantizes to zeros, not NaN


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> e4m3(clamp(x / scale, -448, 448)); scale float32 broadcasting against x (0-d: the whole tensor, [R, 1]:
    one per row)."""
    return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_fp8_rows(x: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (e4m3 [R, C], float32 scale [R, 1]), each row's scale mapping its absolute maximum onto 448.
    row_absmax [R]: each row's absolute maximum when x holds only part of the row (a row-parallel shard)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) if row_absmax is None else row_absmax.float().view(-1, 1)
    scale = (absmax / E4M3_MAX).clamp_(min=SCALE_FLOOR)
    return quantize_fp8(xf, scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float(q) * scale in dtype; scale 0-d (the whole tensor), [R] or [R, 1] (one per row of q)."""
    s = scale.float()
    return (q.float() * (s[:, None] if s.dim() == 1 else s)).to(dtype)
