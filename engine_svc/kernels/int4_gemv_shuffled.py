"""The int4 batch-1 GEMV over a weight pre-shuffled once at load, so that every tile a program streams is one
contiguous run (the Marlin idea, for the GEMV): an alternative to int4_matmul's GEMV for M <= GEMV_MAX_ROWS, with
the same arithmetic.

Layout (shuffle_int4_for_gemv), for the program tile of int4_matmul's GEMV: BLOCK_N output rows by one iteration
of UNROLL sub-groups (TILE_BYTES = UNROLL * SUB / 2 packed bytes per row):
- codes uint8 [row_blocks, tiles, BLOCK_N * TILE_BYTES]: tile t of row block b holds rows b * BLOCK_N + r, bytes
  t * TILE_BYTES + c of the plain qweight [N, K // 2] at r * TILE_BYTES + c (the bytes themselves unchanged: two
  nibbles, even k low). A program's iteration loads one contiguous BLOCK_N * TILE_BYTES run from a base that moves
  by a constant, with constant in-tile offsets: no per-row stride multiply, no row clamp, no weight mask, and
  every warp issues 16-byte loads over one contiguous span.
- scale_offset [row_blocks, tiles, 2, BLOCK_N, UNROLL] in the scales' dtype: each sub-group's scale (then its
  offset) for the tile's rows, one contiguous run each instead of BLOCK_N scattered rows.
Rows are padded to a multiple of BLOCK_N and sub-groups to a multiple of UNROLL with zero codes, scales and offsets
(x is masked past K), so padding adds exactly 0. The layout takes the K // 2 bytes plus 2 * K // SUB scale/offset
values per row again: Int4Linear keeps it beside the plain buffers (the tiled kernel and the torch path read
those).

Results: per output row the kernel adds the same fp32 terms as int4_matmul's GEMV (each sub-group's
s * (x . q) + o * sum(x)) over the same K splits, so the two agree up to the order of fp32 additions inside the
compiled reductions. Every partial result passes through fewer than K roundings, so each kernel is within
gamma(K) * S of the exact sum, S = sum_k |x_k| (|q_k s_k| + |o_k|), gamma(K) = K u / (1 - K u), u = 2^-24, and
|y_shuffled - y_plain| <= 2 gamma(K) S before the one rounding to the output dtype (after which they can differ by
one unit in its last place more). Under the Triton interpreter the order is the same and the results are equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._quant_matmul_common import as_rows, reduce_splits
from engine_svc.kernels.int4_matmul import GEMV_BLOCK_N, GEMV_UNROLL, GEMV_WARPS, gemv_tiles_per_split, sub_group


@dataclass(frozen=True)
class ShuffledInt4:
    codes: torch.Tensor          # uint8 [row_blocks, tiles, block_n * tile_bytes]
    scale_offset: torch.Tensor   # [row_blocks, tiles, 2, block_n, unroll]
    out_features: int
    in_features: int
    group_size: int

    @property
    def block_n(self) -> int:
        return self.scale_offset.shape[3]

    @property
    def unroll(self) -> int:
        return self.scale_offset.shape[4]


@torch.no_grad()
def shuffle_int4_for_gemv(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                          block_n: int = GEMV_BLOCK_N) -> ShuffledInt4:
    """The plain int4 weight (int4_format: qweight uint8 [N, K // 2], scales and offsets [N, K // G]) in the
    layout above, on its device. block_n: the rows of a program (a power of two; tests take small ones)."""
    unroll = GEMV_UNROLL   # the K splits are counted in GEMV iterations (gemv_tiles_per_split)
    n, half_k = qweight.shape
    k = 2 * half_k
    sub = sub_group(group_size)
    if k % group_size or scales.shape != (n, k // group_size) or offsets.shape != scales.shape:
        raise ValueError(f"int4 weight [{n}, {k}] with group size {group_size} needs scales and offsets of shape "
                         f"[{n}, {k // group_size}], got {tuple(scales.shape)} and {tuple(offsets.shape)}")
    num_subs = k // sub
    tiles = triton.cdiv(num_subs, unroll)
    tile_bytes = unroll * sub // 2
    row_blocks = triton.cdiv(n, block_n)
    codes = torch.zeros(row_blocks * block_n, tiles * tile_bytes, dtype=torch.uint8, device=qweight.device)
    codes[:n, :half_k] = qweight
    codes = codes.view(row_blocks, block_n, tiles, tile_bytes).permute(0, 2, 1, 3).reshape(row_blocks, tiles, -1)
    group_of_sub = torch.arange(num_subs, device=qweight.device) * sub // group_size
    so = torch.zeros(2, row_blocks * block_n, tiles * unroll, dtype=scales.dtype, device=qweight.device)
    so[0, :n, :num_subs] = scales[:, group_of_sub]
    so[1, :n, :num_subs] = offsets[:, group_of_sub]
    so = so.view(2, row_blocks, block_n, tiles, unroll).permute(1, 3, 0, 2, 4).contiguous()
    return ShuffledInt4(codes.contiguous(), so, n, k, group_size)


@triton.jit
def _int4_gemv_shuffled_kernel(x_ptr, w_ptr, so_ptr, part_ptr, n, half_k, num_tiles, tiles_per_split,
                               stride_xm, stride_ps, stride_pm,
                               BLOCK_N: tl.constexpr, SUB: tl.constexpr, UNROLL: tl.constexpr):
    """int4_matmul._int4_gemv_kernel's arithmetic over the shuffled layout: one program, BLOCK_N output rows of one
    input row over one K split, one contiguous [BLOCK_N, TILE_BYTES] code tile and two contiguous [BLOCK_N, UNROLL]
    scale and offset tiles per iteration."""
    HALF: tl.constexpr = SUB // 2
    TILE_BYTES: tl.constexpr = UNROLL * HALF
    m = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, TILE_BYTES)
    w_offsets = r[:, None] * TILE_BYTES + c[None, :]
    so_offsets = r[:, None] * UNROLL + tl.arange(0, UNROLL)[None, :]
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N], tl.float32)
    for t in range(first, last):
        tile = block * num_tiles + t
        p = tl.load(w_ptr + tile * (BLOCK_N * TILE_BYTES) + w_offsets)
        byte = t * TILE_BYTES + c
        live = byte < half_k
        xe = tl.load(x_row + 2 * byte, mask=live, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * byte + 1, mask=live, other=0.0).to(tl.float32)
        prod = (p & 0xF).to(tl.float32) * xe[None, :] + (p >> 4).to(tl.float32) * xo[None, :]
        xq = tl.sum(tl.reshape(prod, [BLOCK_N, UNROLL, HALF]), 2)              # x . q per sub-group
        xs = tl.sum(tl.reshape(xe + xo, [UNROLL, HALF]), 1)                    # sum x per sub-group
        so = so_ptr + tile * (2 * BLOCK_N * UNROLL)
        s = tl.load(so + so_offsets).to(tl.float32)
        o = tl.load(so + BLOCK_N * UNROLL + so_offsets).to(tl.float32)
        acc += tl.sum(s * xq + o * xs[None, :], 1)
    rows = block * BLOCK_N + r
    tl.store(part_ptr + split * stride_ps + m * stride_pm + rows, acc, mask=rows < n)


def int4_gemv_shuffled(x: torch.Tensor, w: ShuffledInt4, bias: torch.Tensor | None = None,
                       split_k: int | None = None) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16; a few rows: the decode shape) -> [..., N] in x's dtype, as int4_matmul over the
    plain weight. split_k forces the number of K splits (None: int4_matmul's GEMV choice, so the two kernels
    split K alike)."""
    x2 = as_rows(x, w.in_features)
    m, n = x2.shape[0], w.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    row_blocks, num_tiles = w.codes.shape[:2]
    sub = sub_group(w.group_size)
    per_split = gemv_tiles_per_split(w.in_features // sub, m * row_blocks, x.device, split_k)
    splits = triton.cdiv(num_tiles, per_split)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _int4_gemv_shuffled_kernel[(m, row_blocks, splits)](
        x2, w.codes, w.scale_offset, part, n, w.in_features // 2, num_tiles, per_split,
        x2.stride(0), part.stride(0), part.stride(1),
        BLOCK_N=w.block_n, SUB=sub, UNROLL=w.unroll, num_warps=GEMV_WARPS)
    reduce_splits(part, bias, out)
    return out.view(*x.shape[:-1], n)


__all__ = ["ShuffledInt4", "int4_gemv_shuffled", "shuffle_int4_for_gemv"]
