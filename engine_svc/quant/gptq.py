"""GPTQ checkpoints (AutoGPTQ / transformers "gptq", v1 and v2) -> the int4 format (engine_svc.quant.int4_format),
exactly.

The layout of one linear layer with K inputs, N outputs and group size G (AutoGPTQ's QuantLinear.pack and its
torch dequantization path):
- qweight int32 [K // 8, N]: word [r, n] holds inputs k = 8r + j at bits 4j .. 4j + 3 (packed along k, in order).
- qzeros int32 [K // G, N // 8]: word [g, c] holds outputs n = 8c + j at bits 4j (packed along n, in order).
  v1 checkpoints (checkpoint_format "gptq", the default) store zero - 1, so zero = nibble + 1 (1 .. 16);
  v2 ("gptq_v2", GPTQModel) store the zero itself.
- scales fp16 [K // G, N].
- g_idx int32 [K]: the group of each input. Without act order it is k // G; with desc_act it regroups the inputs,
  which the int4 format (groups are contiguous runs of k) cannot express: refused.
- w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
Ours: offset = -zero * scale; exact in float32 as for AWQ (a 5-bit zero times an 11-bit significand).
"""
from __future__ import annotations

import torch

from engine_svc.quant.int4_format import pack_int4

_SHIFTS = tuple(range(0, 32, 4))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> int32 [..., 8]: nibble j = bits 4j .. 4j + 3."""
    if packed.dtype != torch.int32:
        raise ValueError(f"GPTQ packed tensors are int32, got {packed.dtype}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    return (packed[..., None] >> shifts) & 0xF


def check_trivial_g_idx(g_idx: torch.Tensor, in_features: int, group_size: int) -> None:
    expected = torch.arange(in_features, device=g_idx.device) // group_size
    if g_idx.shape != expected.shape or not torch.equal(g_idx.to(expected.dtype), expected):
        raise ValueError("GPTQ g_idx is not k // group_size (act order, desc_act): not supported; re-quantize "
                         "with desc_act=False")


def gptq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 g_idx: torch.Tensor | None = None, zero_minus_one: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's GPTQ tensors -> (qweight uint8 [N, K // 2], scales f32 [N, K // G], offsets f32 [N, K // G]).
    group_size -1 means one group of K. zero_minus_one: the checkpoint is v1 (stores zero - 1)."""
    rows, n = qweight.shape
    k = rows * 8
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"GPTQ layer with {k} inputs does not split into groups of {g}")
    groups = k // g
    if n % 8 or tuple(qzeros.shape) != (groups, n // 8) or tuple(scales.shape) != (groups, n):
        raise ValueError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)} (K/8, N), qzeros "
                         f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)} expected ({groups}, {n // 8}) "
                         f"and ({groups}, {n}) for group size {g}")
    if g_idx is not None:
        check_trivial_g_idx(g_idx, k, g)
    q = _nibbles(qweight).permute(1, 0, 2).reshape(n, k)          # [K/8, N, 8] -> [N, K/8, 8] -> [N, K]
    zeros = _nibbles(qzeros).reshape(groups, n).t().float()       # [N, K // G]
    if zero_minus_one:
        zeros = zeros + 1
    s = scales.t().float().contiguous()
    return pack_int4(q).contiguous(), s, (-zeros * s).contiguous()
