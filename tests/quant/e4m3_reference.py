"""An fp8 e4m3 (float8_e4m3fn) reference written from the format's definition, independent of torch's fp8 casts:
1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal (m / 8 * 2**-6); S.1111.111 is NaN,
so the largest finite value is 1.75 * 2**8 = 448. Rounding is to nearest, ties to an even mantissa code."""
from __future__ import annotations

import torch


def e4m3_positive_values() -> tuple[torch.Tensor, torch.Tensor]:
    """All finite non-negative e4m3 values in increasing order (float64) and their 7-bit codes."""
    values, codes = [], []
    for code in range(0x7F):               # 0x7F is NaN
        e, m = code >> 3, code & 7
        values.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        codes.append(code)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(codes)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float64 values already within [-448, 448] -> the nearest e4m3 value (float64), ties to even."""
    values, codes = e4m3_positive_values()
    a = x.abs().double().flatten()
    hi = torch.searchsorted(values, a).clamp(max=len(values) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    r = torch.where(pick_hi, values[hi], values[lo])
    return (torch.sign(x.double().flatten()) * r).view(x.shape)


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 in float64: per-output-channel weight scales and per-token activation scales (absmax / 448)."""
    xd, wd = x.double(), w.double()
    sx = xd.abs().amax(1, keepdim=True) / 448
    sw = wd.abs().amax(1, keepdim=True) / 448
    y = (round_to_e4m3(xd / sx) * sx) @ (round_to_e4m3(wd / sw) * sw).t()
    return y if bias is None else y + bias.double()
