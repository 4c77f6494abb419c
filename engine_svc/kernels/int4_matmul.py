"""y = x @ dequant(W)^T + bias for int4 weight-only W in the offset form of engine_svc.quant.int4_format:
w[n, k] = q[n, k] * s[n, k // G] + o[n, k // G], q packed two per byte along k (even k in the low nibble).
Dequantization happens in registers with fp32 accumulation.

The kernels walk K in sub-groups of SUB = the largest power of two dividing G, capped at 128, so that one scale
and one offset per weight row cover a whole sub-group; SUB >= 32 is required (group sizes that are multiples of
32: every AWQ/GPTQ/GGUF 4-bit layout in use). A byte tile unpacks into the even-k (low nibble) and odd-k (high
nibble) halves, which meet the even and odd elements of x: no interleaving in registers.

- GEMV (M <= GEMV_MAX_ROWS), the decode shape, memory-bound: grid (M, cdiv(N, GEMV_BLOCK_N), splits). A program
  streams GEMV_BLOCK_N packed rows over its K split, GEMV_UNROLL sub-groups per iteration, on the CUDA cores; the
  scale and offset factor out of each sub-group's sum. The row index is the fastest grid axis (L2 reuse across the
  M rows). K is split until there are about four programs per SM.
- tiled (M > GEMV_MAX_ROWS): grid (cdiv(M, BM), cdiv(N, BN), splits), one sub-group per K step, dequantized in
  registers to x's dtype and multiplied on the tensor cores.
Both write fp32 partials per split; one reduce sums them, adds the bias and rounds once (no atomics: runs are
bitwise reproducible). Measured on an H100 (bf16, M = 1, CUDA graphs; benchmarks.quant_matmul): 0.5-0.7x the
time of a bf16 F.linear of the same shape.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._attention_tile import dot
from engine_svc.kernels._quant_matmul_common import as_rows, gemv_block_n, num_sms, reduce_splits

GEMV_MAX_ROWS = 4
GEMV_BLOCK_N = 64     # output rows per GEMV program (the GEMV settings: best of 96 on an H100, Llama-3-8B shapes)
GEMV_UNROLL = 4       # sub-groups per GEMV iteration: 4 x 64 bytes per row in flight
GEMV_WARPS = 4
PROGRAMS_PER_SM = 8   # K is split until the programs reach this many per SM
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
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, part_ptr, n, num_subs, subs_per_split, group_size,
                      stride_xm, stride_wn, stride_sn, stride_on, stride_ps, stride_pm,
                      BLOCK_N: tl.constexpr, SUB: tl.constexpr, UNROLL: tl.constexpr):
    """One program: BLOCK_N output rows of one input row over one K split, UNROLL sub-groups (SUB weights each)
    per iteration as one [BLOCK_N, UNROLL * SUB / 2] byte tile. A sub-group lies in one group, so its scale and
    offset factor out: sum_k x_k (q_k s + o) = s (x . q) + o sum_k x_k."""
    HALF: tl.constexpr = SUB // 2
    m = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    safe = tl.minimum(rows, n - 1).to(tl.int64)   # rows past N read row N - 1, dropped at the store
    j = tl.arange(0, UNROLL * HALF)
    u = tl.arange(0, UNROLL)
    first = split * subs_per_split
    last = tl.minimum(first + subs_per_split, num_subs)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N], tl.float32)
    for sg in range(first, last, UNROLL):
        byte = sg * HALF + j
        live = (sg + j // HALF) < last
        p = tl.load(w_ptr + safe[:, None] * stride_wn + byte[None, :], mask=live[None, :], other=0)
        xe = tl.load(x_row + 2 * byte, mask=live, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * byte + 1, mask=live, other=0.0).to(tl.float32)
        prod = (p & 0xF).to(tl.float32) * xe[None, :] + (p >> 4).to(tl.float32) * xo[None, :]
        xq = tl.sum(tl.reshape(prod, [BLOCK_N, UNROLL, HALF]), 2)              # x . q per sub-group
        xs = tl.sum(tl.reshape(xe + xo, [UNROLL, HALF]), 1)                    # sum x per sub-group
        g = (sg + u) * SUB // group_size
        glive = (sg + u) < last
        s = tl.load(s_ptr + safe[:, None] * stride_sn + g[None, :], mask=glive[None, :], other=0.0).to(tl.float32)
        o = tl.load(o_ptr + safe[:, None] * stride_on + g[None, :], mask=glive[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(s * xq + o * xs[None, :], 1)
    tl.store(part_ptr + split * stride_ps + m * stride_pm + rows, acc, mask=rows < n)


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, o_ptr, part_ptr, m, n, group_size, subs_per_split, num_subs,
                        stride_xm, stride_wn, stride_sn, stride_on, stride_ps, stride_pm,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """Tiles of [BLOCK_M, BLOCK_N] over one K split: each sub-group's weight tile is dequantized in registers
    (q * s + o, in x's dtype) and fed to the tensor cores as the even-k and odd-k halves."""
    HALF: tl.constexpr = SUB // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    safe_r = tl.minimum(rows, m - 1).to(tl.int64)
    safe_c = tl.minimum(cols, n - 1).to(tl.int64)
    j = tl.arange(0, HALF)
    first = split * subs_per_split
    last = tl.minimum(first + subs_per_split, num_subs)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for sg in range(first, last):
        byte = sg * HALF + j
        xe = tl.load(x_ptr + safe_r[:, None] * stride_xm + 2 * byte[None, :])
        xo = tl.load(x_ptr + safe_r[:, None] * stride_xm + 2 * byte[None, :] + 1)
        p = tl.load(w_ptr + safe_c[None, :] * stride_wn + byte[:, None])            # packed W^T [HALF, BLOCK_N]
        g = sg * SUB // group_size
        s = tl.load(s_ptr + safe_c * stride_sn + g).to(tl.float32)[None, :]
        o = tl.load(o_ptr + safe_c * stride_on + g).to(tl.float32)[None, :]
        lo = ((p & 0xF).to(tl.float32) * s + o).to(xe.dtype)
        hi = ((p >> 4).to(tl.float32) * s + o).to(xe.dtype)
        acc += dot(xe, lo, IEEE) + dot(xo, hi, IEEE)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc, mask=mask)


def tile_shape(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the tiled kernel for M rows."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return (32 if m <= 32 else 64), 64, 4
    return 128, 128, 8


def _splits(units: int, programs: int, device: torch.device, multiple: int, forced: int | None) -> int:
    """K splits (in sub-groups, each a multiple of `multiple`): enough programs for PROGRAMS_PER_SM per SM."""
    if forced is not None:
        return max(1, min(forced, units))
    sms = num_sms(device)
    if sms is None:
        return 1
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, programs), units // (2 * multiple)))


def gemv_tiles_per_split(num_subs: int, programs: int, device: torch.device, split_k: int | None) -> int:
    """Iterations (GEMV_UNROLL sub-groups each) per K split of the GEMV, for `programs` output tiles: enough splits
    for PROGRAMS_PER_SM programs per SM, or split_k splits when forced."""
    splits = _splits(num_subs, programs, device, GEMV_UNROLL, split_k)
    return triton.cdiv(triton.cdiv(num_subs, splits), GEMV_UNROLL)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None,
                gemv_max_rows: int = GEMV_MAX_ROWS, gemv_rows: int | None = None) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16), qweight uint8 [N, K // 2] (unit stride), scales and offsets [N, K // G], bias
    [N] or None -> [..., N] in x's dtype. split_k forces the K split (None: by the SM count); gemv_max_rows: the
    largest M that takes the GEMV kernel (tests use it to reach both kernels); gemv_rows: output rows per GEMV
    program (None: gemv_block_n's choice). Every kernel writes fp32 partials that one reduce sums (+ bias)."""
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
    num_subs = k // sub
    if m <= gemv_max_rows:
        block_n = gemv_block_n(n, x.device, GEMV_BLOCK_N, gemv_rows)
        per_split = gemv_tiles_per_split(num_subs, m * triton.cdiv(n, block_n), x.device, split_k) * GEMV_UNROLL
        splits = triton.cdiv(num_subs, per_split)
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        _int4_gemv_kernel[(m, triton.cdiv(n, block_n), splits)](
            x2, qweight, scales, offsets, part, n, num_subs, per_split, group_size,
            x2.stride(0), qweight.stride(0), scales.stride(0), offsets.stride(0), part.stride(0), part.stride(1),
            BLOCK_N=block_n, SUB=sub, UNROLL=GEMV_UNROLL, num_warps=GEMV_WARPS)
    else:
        block_m, block_n, warps = tile_shape(m)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        splits = _splits(num_subs, tiles, x.device, 1, split_k)
        per_split = triton.cdiv(num_subs, splits)
        splits = triton.cdiv(num_subs, per_split)
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        _int4_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
            x2, qweight, scales, offsets, part, m, n, group_size, per_split, num_subs,
            x2.stride(0), qweight.stride(0), scales.stride(0), offsets.stride(0), part.stride(0), part.stride(1),
            IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, SUB=sub, num_warps=warps,
            num_stages=3)
    reduce_splits(part, bias, out)
    return out.view(*x.shape[:-1], n)


__all__ = ["gemv_tiles_per_split", "int4_matmul", "sub_group"]
