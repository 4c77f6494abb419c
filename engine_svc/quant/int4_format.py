"""int4 weight-only, group-wise, offset form (see engine_svc.quant): w[n, k] = q * scale[n, g] + offset[n, g],
g = k // group_size, q in [0, 15] packed two per uint8 along k (even k in the low nibble)."""
from __future__ import annotations

import torch

INT4_MAX = 15


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [0, 15] (K even) -> uint8 [N, K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even input dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] in [0, 15]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with each group's min and max: [N, K] float -> (packed uint8 [N, K // 2],
    scale float32 [N, K // G], offset float32 [N, K // G]). A constant group gets scale 1 and is exact."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / INT4_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, INT4_MAX)
    return pack_int4(q.reshape(n, k)), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = q * scale.float()[..., None] + offset.float()[..., None]
    return w.reshape(n, k).to(dtype)
