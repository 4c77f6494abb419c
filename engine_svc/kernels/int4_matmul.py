"""y = x @ dequant(W)^T + bias for int4 weight-only W in the offset form of engine_svc.quant.int4_format:
w[n, k] = q[n, k] * s[n, k // G] + o[n, k // G], q packed two per byte along k (even k in the low nibble).
Dequantization happens in registers with fp32 accumulation.

The kernels walk K in sub-groups of SUB = the largest power of two dividing G, capped at 128, so that one scale
and one offset per weight row cover a whole sub-group; SUB >= 32 is required (group sizes that are multiples of
32: every AWQ/GPTQ/GGUF 4-bit layout in use). A byte tile [rows, SUB / 2] unpacks into the even-k (low nibble) and
odd-k (high nibble) halves, which meet the even and odd elements of x: no interleaving in registers.

- GEMV (M <= GEMV_MAX_ROWS), the decode shape, memory-bound: grid (M, cdiv(N, GEMV_BLOCK_N)); a program streams
  GEMV_BLOCK_N whole packed rows in [GEMV_BLOCK_N, SUBS, SUB / 2] byte tiles (SUBS sub-groups, 256 bytes per row
  per tile), dequantizing elementwise (q * s + o) into an fp32 tile summed once at the end. Nibbles become floats
  exactly with an OR and a subtraction (nibble_to_float). The row index is the fastest grid axis (L2 reuse across
  the M rows, as in int8_matmul).
- tiled (M > GEMV_MAX_ROWS): grid (cdiv(M, BM), cdiv(N, BN), splits), one sub-group per K step. The scale and
  offset factor out of the sub-group's dot product: sum_k x_k (q_k s + o) = s * (x . q) + o * sum_k x_k, so the raw
  nibbles (exact in any float dtype) go to tl.dot and s, o are applied per output tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine_svc.kernels._quant_matmul_common import (as_rows, choose_split_k, dot, gemv_block_n,
                                                     nibble_to_float, reduce_splits)

GEMV_MAX_ROWS = 4
GEMV_BLOCK_N = 8
GEMV_TILE_K = 512     # weights per row per GEMV tile (256 bytes)
MAX_SUB = 128
MIN_SUB = 32


def sub_group(group_size: int) -> int:
    """The K step of the kernels for a group size; raises ValueError if the kernels cannot take it."""
    sub = min(group_size & -group_size, MAX_SUB)
    if sub < MIN_SUB:
        raise ValueError(f"the int4 Triton kernels need a group size that is a multiple of {MIN_SUB}, "
                         f"got {group_size}")
    return sub


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, out_ptr, n, k, group_size,
                      stride_xm, stride_wn, stride_sn, stride_on, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr, SUB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    safe_cols = tl.minimum(cols, n - 1).to(tl.int64)   # rows past N read row N - 1, dropped at the store
    sub = tl.arange(0, SUBS)
    j = tl.arange(0, SUB // 2)
    w_rows = w_ptr + safe_cols[:, None, None] * stride_wn
    s_rows = s_ptr + safe_cols[:, None] * stride_sn
    o_rows = o_ptr + safe_cols[:, None] * stride_on
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros([BLOCK_N, SUBS, SUB // 2], tl.float32)
    for k0 in range(0, k, SUBS * SUB):
        starts = k0 + sub * SUB                      # first k of each sub-group; K is a multiple of SUB
        live = starts < k
        even_k = starts[None, :, None] + 2 * j[None, None, :]
        packed = tl.load(w_rows + even_k // 2, mask=live[None, :, None], other=0)
        xe = tl.load(x_row + even_k, mask=live[None, :, None], other=0.0).to(tl.float32)
        xo = tl.load(x_row + even_k + 1, mask=live[None, :, None], other=0.0).to(tl.float32)
        g = starts // group_size
        s = tl.load(s_rows + g[None, :], mask=live[None, :], other=0.0).to(tl.float32)[:, :, None]
        o = tl.load(o_rows + g[None, :], mask=live[None, :], other=0.0).to(tl.float32)[:, :, None]
        lo = nibble_to_float(packed & 0xF)
        hi = nibble_to_float(packed >> 4)
        acc += (lo * s + o) * xe + (hi * s + o) * xo
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, out_ptr, part_ptr, m, n, k, group_size, k_per_split,
                        stride_xm, stride_wn, stride_sn, stride_on, stride_om, stride_ps, stride_pm,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    safe_cols = tl.minimum(cols, n - 1).to(tl.int64)
    j = tl.arange(0, SUB // 2)
    x_rows = x_ptr + tl.minimum(rows, m - 1).to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + safe_cols[None, :] * stride_wn                  # packed W^T tile [SUB / 2, BLOCK_N]
    k_lo = split * k_per_split                                       # a multiple of SUB, like K
    k_hi = tl.minimum(k_lo + k_per_split, k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, SUB):
        xe = tl.load(x_rows + (k0 + 2 * j)[None, :])
        xo = tl.load(x_rows + (k0 + 2 * j + 1)[None, :])
        packed = tl.load(w_cols + (k0 // 2 + j)[:, None])
        lo = (packed & 0xF).to(xe.dtype)
        hi = (packed >> 4).to(xe.dtype)
        raw = dot(xe, lo, IEEE) + dot(xo, hi, IEEE)                  # sum_k x_k q_k over the sub-group
        x_sum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), 1)
        g = k0 // group_size
        s = tl.load(s_ptr + safe_cols * stride_sn + g).to(tl.float32)
        o = tl.load(o_ptr + safe_cols * stride_on + g).to(tl.float32)
        acc += raw * s[None, :] + x_sum[:, None] * o[None, :]
    out_mask = (rows < m)[:, None] & (cols < n)[None, :]
    if SPLIT:
        tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def tile_shape(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the tiled kernel for M rows."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return (32 if m <= 32 else 64), 64, 4
    return 128, 128, 8


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None,
                gemv_max_rows: int = GEMV_MAX_ROWS, gemv_rows: int | None = None) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16), qweight uint8 [N, K // 2] (unit stride), scales and offsets [N, K // G], bias
    [N] or None -> [..., N] in x's dtype. split_k forces the K split of the tiled kernel (None: by the SM count);
    gemv_max_rows: the largest M that takes the GEMV kernel (tests use it to reach both kernels);
    gemv_rows: output rows per GEMV program (None: gemv_block_n's choice)."""
    n, half_k = qweight.shape
    k = 2 * half_k
    assert qweight.dtype == torch.uint8 and qweight.stride(1) == 1, "qweight must be uint8 [N, K // 2]"
    if k % group_size or scales.shape != (n, k // group_size) or offsets.shape != scales.shape:
        raise ValueError(f"int4 weight [{n}, {k}] with group size {group_size} needs scales and offsets of shape "
                         f"[{n}, {k // group_size}], got {tuple(scales.shape)} and {tuple(offsets.shape)}")
    sub = sub_group(group_size)
    x2 = as_rows(x, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    has_bias = bias is not None
    b = bias if has_bias else scales
    if m <= gemv_max_rows:
        rows_per_program = gemv_block_n(n, x.device, GEMV_BLOCK_N, gemv_rows)
        _int4_gemv_kernel[(m, triton.cdiv(n, rows_per_program))](
            x2, qweight, scales, offsets, b, out, n, k, group_size,
            x2.stride(0), qweight.stride(0), scales.stride(0), offsets.stride(0), out.stride(0),
            HAS_BIAS=has_bias, BLOCK_N=rows_per_program, SUBS=GEMV_TILE_K // sub, SUB=sub, num_warps=4)
        return out.view(*x.shape[:-1], n)
    block_m, block_n, warps = tile_shape(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = k // sub
    splits = max(1, min(split_k if split_k is not None else choose_split_k(tiles, k_tiles, x.device), k_tiles))
    k_per_split = triton.cdiv(k_tiles, splits) * sub
    splits = triton.cdiv(k, k_per_split)   # no empty split
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    _int4_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, qweight, scales, offsets, b, out, part, m, n, k, group_size, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), offsets.stride(0), out.stride(0),
        part.stride(0) if splits > 1 else 0, part.stride(1) if splits > 1 else 0,
        HAS_BIAS=has_bias, SPLIT=splits > 1, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, SUB=sub, num_warps=warps, num_stages=3)
    if splits > 1:
        reduce_splits(part, bias, out)
    return out.view(*x.shape[:-1], n)


__all__ = ["int4_matmul", "sub_group"]
