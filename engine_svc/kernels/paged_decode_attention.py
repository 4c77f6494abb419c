"""Decode attention over the paged KV cache: one query token per sequence, GQA-aware, split-KV (flash-decoding).

Grid of the main kernel: (num_seqs, kv_heads, num_splits). A program owns one KV head of one sequence and the
contiguous slice [split * partition_size, (split + 1) * partition_size) of its context; it reads each key/value of
that slice once for all GROUP = heads // kv_heads query heads sharing the KV head (the group is padded to at least
16 rows so tl.dot can be used). With one split the program writes the final output directly; with several, each
writes its normalised partial output and log-sum-exp, and a reduce kernel (grid (num_seqs, heads)) combines the
splits: out = sum_i exp(lse_i - lse) * o_i with lse = log sum_i exp(lse_i). Splitting lets a small batch with long
contexts occupy every SM, at the cost of one extra fp32 round trip per split.

Sliding window (SLIDING, window w): the query at position seq_len - 1 sees keys at positions >= seq_len - w only.
The splits then tile that range instead of the whole context: split s covers [lo + s * partition_size, ...) with
lo = max(0, seq_len - w), so the grid needs cdiv(min(max_seq_len, w), partition_size) splits, no split lies wholly
before the window, and splits past a short sequence's end are empty (the reduce skips them) as without a window.

fp8 cache (FP8): tiles are loaded as e4m3 and converted exactly to q's dtype; the dequantization by the layer's
scales (fp8_numerics.dequantize_fp8) is folded into scalars, s = (q . k_stored) * (softmax scale * K scale) and
o = (sum p v_stored / l) * V scale, so no tile is multiplied element-wise.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._attention_tile import attend_tile
from engine_svc.kernels.kv_scales import check_scales

LOG2E = 1.4426950408889634
BLOCK_N = 64                 # keys per tile
MIN_PARTITION = 256          # a split below this many keys costs more in the reduction than it gains


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, kv_scales_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr, part_o_ptr,
    part_lse_ptr, scale_log2, partition_size, block_size, head_dim, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_kv, stride_cache_block, stride_cache_tok, stride_cache_head, stride_table,
    stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, SLIDING: tl.constexpr, FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if FP8:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_ptr + seq).to(tl.int64)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)

    lo = split * partition_size
    if SLIDING:                                        # the splits tile the window, not the whole context
        lo += tl.maximum(seq_len - window, 0)
    hi = tl.minimum(lo + partition_size, seq_len)      # empty (hi <= lo) for splits past this sequence's end
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    last = tl.zeros([GROUP_PAD], tl.int32) + (hi - 1)  # every row sees keys < hi

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_kv
    table = block_tables_ptr + seq * stride_table
    for start in range(lo, full_hi, BLOCK_N):
        acc, m, l = attend_tile(acc, m, l, q, k_base, v_base, table, start, hi, last, block_size,
                                stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                                False, BLOCK_N, BLOCK_D, IEEE, False)
    # At most one ragged tail tile. Keys from lo on are all inside the window: only the end needs a mask.
    for start in range(full_hi, hi, BLOCK_N):
        acc, m, l = attend_tile(acc, m, l, q, k_base, v_base, table, start, hi, last, block_size,
                                stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                                True, BLOCK_N, BLOCK_D, IEEE, False)

    has_keys = l > 0.0
    l_safe = tl.where(has_keys, l, 1.0)
    o = acc / l_safe[:, None]
    if FP8:   # linear in o, so the partial outputs of the splits may carry it into the reduction
        o = o * tl.load(kv_scales_ptr + 1)
    if SPLIT:
        po = part_o_ptr + seq * stride_po_s + split * stride_po_p
        tl.store(po + heads[:, None] * stride_po_h + d[None, :], o, mask=row_mask)
        lse = tl.where(has_keys, m + tl.log2(l_safe), float("-inf"))   # log2 domain, like m
        tl.store(part_lse_ptr + seq * stride_pl_s + heads * stride_pl_h + split, lse, mask=g < GROUP)
    else:
        out = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _reduce_kernel(
    part_o_ptr, part_lse_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    partition_size, num_splits, head_dim, window,
    stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_ptr + seq).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    # Splits that start past this sequence's end wrote nothing meaningful; split 0 always holds keys.
    lo = 0
    if SLIDING:
        lo = tl.maximum(seq_len - window, 0)
    used = (sp < num_splits) & (lo + sp * partition_size < seq_len)
    lse = tl.load(part_lse_ptr + seq * stride_pl_s + head * stride_pl_h + sp, mask=used, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(used, w, 0.0)
    o = tl.load(part_o_ptr + seq * stride_po_s + head * stride_po_h + sp[:, None] * stride_po_p + d[None, :],
                mask=used[:, None] & (d < head_dim)[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < head_dim)


_NUM_SMS: dict[int, int] = {}


def default_partition_size(max_seq_len: int, num_seqs: int, kv_heads: int, device: torch.device) -> int | None:
    """Keys per split, or None for no split. Splits only when (sequence, KV head) programs alone would leave SMs
    idle, aiming at about two programs per SM, and never below MIN_PARTITION keys per split."""
    if device.type != "cuda" or max_seq_len <= MIN_PARTITION:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    programs = num_seqs * kv_heads
    if programs >= _NUM_SMS[index]:
        return None
    splits = min(triton.cdiv(2 * _NUM_SMS[index], programs), triton.cdiv(max_seq_len, MIN_PARTITION))
    if splits <= 1:
        return None
    return triton.cdiv(triton.cdiv(max_seq_len, splits), BLOCK_N) * BLOCK_N


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                           max_seq_len: int, partition_size: int | None = None,
                           block_n: int = BLOCK_N, window: int | None = None,
                           kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [num_seqs, heads, head_dim], one row per sequence (row query_start[i] for sequence i); kv_cache
    [2, num_blocks, block_size, kv_heads, head_dim] already holding each sequence's seq_lens[i] keys/values.
    partition_size: keys per split (a multiple of block_n, or a power of two >= 16 below it); None picks
    default_partition_size. window: attend only to the last this-many keys of each sequence (None: all).
    kv_scales: float32 [2] (K, V) of an fp8 cache, None for any other."""
    fp8 = check_scales(kv_cache, kv_scales)
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    assert num_heads % kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous"
    group = num_heads // kv_heads
    sliding = window is not None
    if sliding:
        assert window > 0, "the sliding window must be positive"
    span = min(max_seq_len, window) if sliding else max_seq_len   # keys one sequence attends to, at most
    if partition_size is None:
        partition_size = default_partition_size(span, num_seqs, kv_heads, q.device)
    partition_size = partition_size or triton.cdiv(max(span, 1), block_n) * block_n
    block_n = min(block_n, partition_size)   # small partitions (tests) use tiles of their own size
    assert partition_size % block_n == 0 and block_n >= 16, "partition_size must be a multiple of a 16+ key tile"
    num_splits = triton.cdiv(max(span, 1), partition_size)
    split = num_splits > 1

    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if split:
        part_o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:  # unused; any tensor fills the pointer slots
        part_o, part_lse = out, out
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        q, kv_cache, kv_scales if fp8 else seq_lens, block_tables, seq_lens, query_start, out, part_o, part_lse,
        scale * LOG2E, partition_size, block_size, head_dim, window if sliding else 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        *(part_o.stride()[:3] if split else (0, 0, 0)), *(part_lse.stride()[:2] if split else (0, 0)),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=split, IEEE=q.dtype == torch.float32, SLIDING=sliding, FP8=fp8,
    )
    if split:
        _reduce_kernel[(num_seqs, num_heads)](
            part_o, part_lse, seq_lens, query_start, out, partition_size, num_splits, head_dim,
            window if sliding else 0,
            *part_o.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_D=block_d, SLIDING=sliding,
        )
    return out


__all__ = ["default_partition_size", "paged_decode_attention"]
