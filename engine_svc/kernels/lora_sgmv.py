"""Batched multi-LoRA (SGMV style): each token of a step adds x @ A[slot]^T @ B[slot]^T for its adapter slot.

Tokens are visited through a plan built on the host (engine_svc.lora.batch): the tokens that use an adapter, grouped
by slot (sorted_tokens), cut into tiles of at most TILE tokens of one slot (tile_start/tile_len/tile_slot, offsets
into sorted_tokens). Base-model tokens are in no tile and cost nothing; a tile reads its adapter's weights once for
up to TILE tokens. Unused tile entries have length 0 and their programs exit at once, so the grid depends only on
the number of tokens (a CUDA graph replays it with any plan).

Weights of one fused projection with S slices (q|k|v: 3, gate|up: 2, others 1), rank padded to R = r_max:
  A [max_loras, S * R, in]: slice j's A in rows j*R .. j*R + rank;
  B [max_loras, out, R]: output columns of slice j (bounds[j] .. bounds[j+1]) read rank chunk j of the shrink.
Only the first slot_ranks[slot] ranks of a chunk are computed; the rest are padding.

Two kernels:
  shrink: s[split, t, :] = x[t, k-range of split] @ A[slot]^T, fp32 (split-K partial sums when there are few tiles,
          so small decode batches still spread over the GPU);
  expand: y[t, slice j] += (sum over splits of s[:, t, chunk j]) @ B[slot, slice j]^T, in place.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._attention_tile import dot
from engine_svc.kernels.lora_tile import TILE

BLOCK_R = 16
BLOCK_K = 128
BLOCK_N = 64
_TARGET_PROGRAMS = 512
_MIN_K_PER_SPLIT = 512   # every split's partial sums are read again by each expand program: few, large splits


@triton.jit
def _tile(sorted_ptr, tstart_ptr, tlen_ptr, tslot_ptr, ranks_ptr, BLOCK_T: tl.constexpr):
    tile = tl.program_id(0)
    n = tl.load(tlen_ptr + tile)
    slot = tl.load(tslot_ptr + tile)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    t = tl.arange(0, BLOCK_T)
    tmask = t < n
    rows = tl.load(sorted_ptr + tl.load(tstart_ptr + tile) + t, mask=tmask, other=0).to(tl.int64)
    return n, slot.to(tl.int64), rank, rows, tmask


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, ranks_ptr, sorted_ptr, tstart_ptr, tlen_ptr, tslot_ptr,
                   K, R_MAX, k_per_split, stride_x, stride_al, stride_ar, stride_ss, stride_st,
                   R_BLOCKS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
    n, slot, rank, rows, tmask = _tile(sorted_ptr, tstart_ptr, tlen_ptr, tslot_ptr, ranks_ptr, BLOCK_T)
    rb = tl.program_id(1)
    r0 = (rb % R_BLOCKS) * BLOCK_R
    if (n > 0) & (r0 < rank):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < rank
        r = (rb // R_BLOCKS) * R_MAX + rr
        k_begin = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_end
            xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=tmask[:, None] & kmask[None, :],
                         other=0.0)
            at = tl.load(a_ptr + slot * stride_al + r[None, :] * stride_ar + k[:, None],
                         mask=rmask[None, :] & kmask[:, None], other=0.0)
            acc += dot(xt, at, IEEE)
        s_off = tl.program_id(2) * stride_ss + rows[:, None] * stride_st + r[None, :]
        tl.store(s_ptr + s_off, acc, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(y_ptr, s_ptr, b_ptr, ranks_ptr, sorted_ptr, tstart_ptr, tlen_ptr, tslot_ptr, bounds_ptr,
                   N, R_MAX, num_splits, stride_y, stride_ss, stride_st, stride_bl, stride_bn,
                   NUM_SLICES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   IEEE: tl.constexpr):
    n, slot, rank, rows, tmask = _tile(sorted_ptr, tstart_ptr, tlen_ptr, tslot_ptr, ranks_ptr, BLOCK_T)
    if n > 0:
        c0 = tl.program_id(1) * BLOCK_N
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(NUM_SLICES):
            lo = tl.load(bounds_ptr + j)
            hi = tl.load(bounds_ptr + j + 1)
            if (c0 < hi) & (c0 + BLOCK_N > lo):
                in_slice = cmask & (cols >= lo) & (cols < hi)
                for r0 in range(0, rank, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    rmask = rr < rank
                    s_mask = tmask[:, None] & rmask[None, :]
                    s_off = rows[:, None] * stride_st + (j * R_MAX + rr)[None, :]
                    s = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
                    for sp in range(num_splits):
                        s += tl.load(s_ptr + sp * stride_ss + s_off, mask=s_mask, other=0.0)
                    bt = tl.load(b_ptr + slot * stride_bl + cols[None, :] * stride_bn + rr[:, None],
                                 mask=rmask[:, None] & in_slice[None, :], other=0.0)
                    acc += dot(s.to(bt.dtype), bt, IEEE)
        y_off = rows[:, None] * stride_y + cols[None, :]
        ymask = tmask[:, None] & cmask[None, :]
        y = tl.load(y_ptr + y_off, mask=ymask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_off, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def k_splits(k: int, programs: int) -> tuple[int, int]:
    """(number of K splits, columns per split) of the shrink: K is split only when the other grid dimensions alone
    (programs) would leave the GPU idle."""
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(k, _MIN_K_PER_SPLIT)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    return triton.cdiv(k, k_per_split), k_per_split


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot_ranks: torch.Tensor,
             slice_bounds: torch.Tensor, sorted_tokens: torch.Tensor, tile_start: torch.Tensor,
             tile_len: torch.Tensor, tile_slot: torch.Tensor) -> None:
    """y[t] += x[t] @ A[slot]^T @ B[slot]^T (per slice) for every token t in the tiles, in place.
    x [T, in], y [T, out] (rows contiguous), a [L, S*R, in], b [L, out, R], slice_bounds int32 [S+1],
    tile arrays int32 [num_tiles]; the grid has num_tiles rows whatever the plan holds."""
    num_tiles = tile_len.shape[0]
    if num_tiles == 0 or x.shape[0] == 0:
        return
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous()
    num_slices = slice_bounds.shape[0] - 1
    k, r_max, n = x.shape[1], b.shape[2], y.shape[1]
    r_blocks = triton.cdiv(r_max, BLOCK_R)
    ieee = x.dtype == torch.float32
    splits, k_per_split = k_splits(k, num_tiles * num_slices * r_blocks)
    s = torch.empty(splits, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_tiles, num_slices * r_blocks, splits)](
        x, a, s, slot_ranks, sorted_tokens, tile_start, tile_len, tile_slot,
        k, r_max, k_per_split, x.stride(0), a.stride(0), a.stride(1), s.stride(0), s.stride(1),
        R_BLOCKS=r_blocks, BLOCK_T=TILE, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, IEEE=ieee)
    _expand_kernel[(num_tiles, triton.cdiv(n, BLOCK_N))](
        y, s, b, slot_ranks, sorted_tokens, tile_start, tile_len, tile_slot, slice_bounds,
        n, r_max, splits, y.stride(0), s.stride(0), s.stride(1), b.stride(0), b.stride(1),
        NUM_SLICES=num_slices, BLOCK_T=TILE, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, IEEE=ieee)


__all__ = ["TILE", "add_lora", "k_splits"]
