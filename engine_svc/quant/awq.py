"""AutoAWQ GEMM checkpoints -> the int4 format (engine_svc.quant.int4_format), exactly.

The layout of one linear layer with K inputs, N outputs and group size G (AutoAWQ's WQLinear_GEMM, read from its
`from_linear` packing and its `dequantize_gemm`):
- qweight int32 [K, N // 8]: word [k, c] holds the eight 4-bit values of outputs n = 8c + ORDER[i] at bits
  4i .. 4i + 3, ORDER = (0, 2, 4, 6, 1, 3, 5, 7) (the interleave the GEMM kernel unpacks with).
- qzeros int32 [K // G, N // 8]: the zero points, packed along n the same way; stored as is (no "- 1").
- scales fp16 [K // G, N].
- w[n, k] = (q[k, n] - zero[k // G, n]) * scale[k // G, n].
Ours: offset = -zero * scale. In float32 both zero * scale (4-bit times 11-bit significand) and q * scale are
exact, so q * scale + offset equals (q - zero) * scale exactly.
"""
from __future__ import annotations

import torch

from engine_svc.quant.int4_format import pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# natural[..., n] = interleaved[..., _NATURAL[n]]: where output n sits inside its word
_NATURAL = tuple(AWQ_ORDER.index(n) for n in range(8))


def unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along columns in AWQ order -> uint8 [R, 8 C] in natural column order."""
    if packed.dtype != torch.int32:
        raise ValueError(f"AWQ packed tensors are int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF        # [R, C, 8]: nibble i = output 8c + AWQ_ORDER[i]
    nibbles = nibbles[..., list(_NATURAL)]
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's AWQ GEMM tensors -> (qweight uint8 [N, K // 2], scales f32 [N, K // G], offsets f32 [N, K // G]).
    group_size -1 means one group of K."""
    k, words = qweight.shape
    n = words * 8
    g = k if group_size == -1 else group_size
    if k % g or k % 2:
        raise ValueError(f"AWQ layer with {k} inputs does not split into groups of {g} (even K required)")
    groups = k // g
    if tuple(qzeros.shape) != (groups, words) or tuple(scales.shape) != (groups, n):
        raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)} (K, N/8), qzeros "
                         f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)} expected ({groups}, {words}) "
                         f"and ({groups}, {n}) for group size {g}")
    q = unpack_awq_columns(qweight).t()                  # [N, K]
    zeros = unpack_awq_columns(qzeros).t().float()       # [N, K // G]
    s = scales.t().float().contiguous()
    return pack_int4(q).contiguous(), s, (-zeros * s).contiguous()
