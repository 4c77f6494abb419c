"""int8 weight-only, per output channel, symmetric (see engine_svc.quant): w = q * scale[n]."""
from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8(w: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale float32 [N]). Round to nearest; an all-zero row gets scale 1.
    row_absmax: each row's absolute maximum when w is only part of the row (a row-parallel shard: the maximum over
    every rank's columns, so each rank's part is the whole row's quantization cut)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) if row_absmax is None else row_absmax.float()) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)
