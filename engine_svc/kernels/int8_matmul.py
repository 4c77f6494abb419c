"""y = x @ dequant(W)^T + bias for int8 weight-only W (engine_svc.quant.int8_format: w[n, k] = q[n, k] * s[n]),
with the dequantization in registers and fp32 accumulation. The per-channel scale factors out of the dot product,
so it is applied once per output: y[m, n] = s[n] * sum_k x[m, k] q[n, k].

Two kernels, by the number of rows M:
- GEMV (M <= GEMV_MAX_ROWS), the decode shape, memory-bound: grid (M, cdiv(N, GEMV_BLOCK_N)); a program streams
  GEMV_BLOCK_N whole weight rows (all of K) in [GEMV_BLOCK_N, GEMV_BLOCK_K] tiles, multiplying elementwise into an
  fp32 tile that is summed once at the end. Few rows per program means many programs (1024 for N = 4096), enough
  to keep every SM's loads in flight without a K split. The row index is the fastest grid axis, so the programs of
  the M rows reading the same weight rows run together and all but the first read hit L2.
- tiled (M > GEMV_MAX_ROWS): grid (cdiv(M, BM), cdiv(N, BN), splits); the int8 tile is converted to the activation
  dtype (exact: |q| <= 127) and fed to tl.dot; split-K (see _quant_matmul_common) when the tiles are too few.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._attention_tile import dot
from engine_svc.kernels._quant_matmul_common import as_rows, choose_split_k, gemv_block_n, reduce_splits

GEMV_MAX_ROWS = 4
GEMV_BLOCK_N = 4
GEMV_BLOCK_K = 512


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, row_scale_ptr, n, k, stride_xm, stride_wn, stride_om,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ROW_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    # Rows past N read row N - 1 (in bounds) and are dropped at the store: no mask on the weight stream.
    w_rows = w_ptr + tl.minimum(cols, n - 1).to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + row * stride_xm
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_row + k0 + kk)
            w = tl.load(w_rows + (k0 + kk)[None, :])
        else:
            k_mask = k0 + kk < k
            x = tl.load(x_row + k0 + kk, mask=k_mask, other=0.0)
            w = tl.load(w_rows + (k0 + kk)[None, :], mask=k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1) * tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if ROW_SCALE:   # W8A8: the input row's own quantization scale
        y *= tl.load(row_scale_ptr + row)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, part_ptr, m, n, k, k_per_split,
                        stride_xm, stride_wn, stride_om, stride_ps, stride_pm,
                        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tl.minimum(rows, m - 1).to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + tl.minimum(cols, n - 1).to(tl.int64)[None, :] * stride_wn    # W^T tile [BLOCK_K, BLOCK_N]
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = k0 + kk < k_hi
        x = tl.load(x_rows + (k0 + kk)[None, :], mask=k_mask[None, :], other=0.0)
        w = tl.load(w_cols + (k0 + kk)[:, None], mask=k_mask[:, None], other=0)
        acc += dot(x, w.to(x.dtype), IEEE)
    acc *= tl.load(s_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows < m)[:, None] & (cols < n)[None, :]
    if SPLIT:
        tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def tile_shape(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the tiled kernel for M rows."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return (32 if m <= 32 else 64), 64, 128, 4
    return 128, 128, 64, 8


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, row_scales: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
              block_n: int | None = None) -> torch.Tensor:
    """y[m, n] = row_scales[m] * scales[n] * (x[m] . weight[n]) + bias[n] for a few rows, with the GEMV kernel: any
    8-bit weight whose elements convert exactly to fp32 (int8, float8_e4m3fn) and any x dtype (e4m3 too: W8A8 with
    per-token row_scales [M, 1] float32). Returns [M, N] in out_dtype (default x's); block_n: output rows per
    program (None: gemv_block_n's choice)."""
    n, k = weight.shape
    m = x.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and x.shape[1] == k
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    block_n = gemv_block_n(n, x.device, GEMV_BLOCK_N, block_n)
    _int8_gemv_kernel[(m, triton.cdiv(n, block_n))](
        x, weight, scales, bias if bias is not None else scales, out,
        row_scales if row_scales is not None else scales, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % GEMV_BLOCK_K == 0, BLOCK_N=block_n, BLOCK_K=GEMV_BLOCK_K,
        ROW_SCALE=row_scales is not None, num_warps=4)
    return out


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                split_k: int | None = None, gemv_max_rows: int = GEMV_MAX_ROWS,
                gemv_rows: int | None = None) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16), qweight int8 [N, K] (unit stride along K), scales [N], bias [N] or None ->
    [..., N] in x's dtype. split_k forces the K split of the tiled kernel (None: by the SM count);
    gemv_max_rows: the largest M that takes the GEMV kernel (tests use it to reach both kernels);
    gemv_rows: output rows per GEMV program (None: gemv_block_n's choice)."""
    n, k = qweight.shape
    assert qweight.dtype == torch.int8 and qweight.stride(1) == 1, "qweight must be int8 [N, K], K contiguous"
    x2 = as_rows(x, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    has_bias = bias is not None
    if m <= gemv_max_rows:
        return int8_gemv(x2, qweight, scales, bias=bias, block_n=gemv_rows).view(*x.shape[:-1], n)
    block_m, block_n, block_k, warps = tile_shape(m)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    splits = max(1, min(split_k if split_k is not None else choose_split_k(tiles, k_tiles, x.device), k_tiles))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)   # no empty split
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    _int8_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, qweight, scales, bias if has_bias else scales, out, part, m, n, k, k_per_split,
        x2.stride(0), qweight.stride(0), out.stride(0), part.stride(0) if splits > 1 else 0,
        part.stride(1) if splits > 1 else 0,
        HAS_BIAS=has_bias, SPLIT=splits > 1, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)
    if splits > 1:
        reduce_splits(part, bias, out)
    return out.view(*x.shape[:-1], n)


__all__ = ["int8_matmul"]
