"""Causal attention of variable-length query chunks over the paged KV cache (prefill, chunked prefill, prefix
hits, and q_len == 1 rows in mixed batches).

Sequence i has q_len = query_start[i+1] - query_start[i] new tokens at the end of its seq_len[i] cached tokens:
query token t sits at position ctx + t (ctx = seq_len - q_len) and sees keys at positions 0 .. ctx + t, which are
all in the cache already (write_kv runs first), read through the block table.

GQA packing: the GROUP = heads // kv_heads query heads of one KV head are folded into the row dimension, row
f <-> (token f // GROUP, head kv_head * GROUP + f % GROUP), so a program reads each key/value tile once for all of
them. Grid: (cdiv(max_q_len * GROUP, BLOCK_M), num_seqs, kv_heads); programs past a sequence's rows do nothing.
Each program runs a flash-attention online softmax over key tiles 0 .. its last row's position: first the tiles
every row of the tile sees entirely (no mask), then the few diagonal tiles with the causal mask.

Sliding window (SLIDING, window w): row r at position p sees keys p - w < j <= p. A program starts at the lowest
key its first row sees, max(0, first_pos - w + 1); the tiles below max(0, last_pos - w + 1) that some of its rows
see only partly are masked like the diagonal ones, then come the unmasked tiles every row sees entirely (none when
w is shorter than the program's span of positions), then the diagonal tiles.

fp8 cache (FP8): as in the decode kernel, the K scale is folded into the softmax scale and the V scale into the
normalised output; the tiles are only converted (exactly) from e4m3 to q's dtype.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._attention_tile import attend_tile
from engine_svc.kernels.kv_scales import check_scales

LOG2E = 1.4426950408889634
BLOCK_M = 64     # packed (token, head) rows per program
BLOCK_N = 64     # keys per tile


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, kv_scales_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
    scale_log2, block_size, head_dim, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_kv, stride_cache_block, stride_cache_tok, stride_cache_head, stride_table,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, SLIDING: tl.constexpr, FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    if FP8:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len * GROUP
    # Padding rows borrow the last token, so every row has visible keys and no row's max stays -inf.
    tok = tl.minimum(rows // GROUP, q_len - 1)
    heads = kv_head * GROUP + rows % GROUP
    q_pos = ctx + tok
    d = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (d < head_dim)[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=mask, other=0.0)

    active = tile * BLOCK_M < q_len * GROUP
    first_pos = ctx + (tile * BLOCK_M) // GROUP
    kv_end = tl.where(active, ctx + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1) + 1, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_kv
    table = block_tables_ptr + seq * stride_table
    if SLIDING:
        # kv_end - 1 is the last row's position. Keys from full_lo on are above every row's window start.
        lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(kv_end - window, 0)
        full_start = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N
        for start in range(lo, tl.minimum(full_start, kv_end), BLOCK_N):
            acc, m, l = attend_tile(acc, m, l, q, k_base, v_base, table, start, kv_end, q_pos, block_size,
                                    stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                                    True, BLOCK_N, BLOCK_D, IEEE, True)
    else:
        full_start = 0
    # Keys below first_pos + 1 are visible to every row of the tile: whole tiles of them need no mask.
    full_end = full_start + tl.maximum(tl.where(active, first_pos + 1, 0) - full_start, 0) // BLOCK_N * BLOCK_N
    for start in range(full_start, full_end, BLOCK_N):
        acc, m, l = attend_tile(acc, m, l, q, k_base, v_base, table, start, kv_end, q_pos, block_size,
                                stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                                False, BLOCK_N, BLOCK_D, IEEE, SLIDING)
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m, l = attend_tile(acc, m, l, q, k_base, v_base, table, start, kv_end, q_pos, block_size,
                                stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                                True, BLOCK_N, BLOCK_D, IEEE, SLIDING)

    l = tl.where(l > 0.0, l, 1.0)   # only inactive programs have l == 0, and they store nothing
    o = acc / l[:, None]
    if FP8:
        o = o * tl.load(kv_scales_ptr + 1)
    out = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mask)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                            max_query_len: int, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                            window: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [num_tokens, heads, head_dim] (sequence i owns rows query_start[i]:query_start[i+1]); kv_cache
    [2, num_blocks, block_size, kv_heads, head_dim] already holding every sequence's seq_lens[i] keys/values.
    window: a query at position p sees only keys at positions > p - window (None: all up to p).
    kv_scales: float32 [2] (K, V) of an fp8 cache, None for any other.
    Returns [num_tokens, heads, head_dim] in q's dtype."""
    fp8 = check_scales(kv_cache, kv_scales)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[3]
    assert num_heads % kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous"
    group = num_heads // kv_heads
    if window is not None:
        assert window > 0, "the sliding window must be positive"
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    grid = (triton.cdiv(max_query_len * group, block_m), num_seqs, kv_heads)
    _prefill_kernel[grid](
        q, kv_cache, kv_scales if fp8 else seq_lens, block_tables, seq_lens, query_start, out,
        scale * LOG2E, block_size, head_dim, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IEEE=q.dtype == torch.float32, SLIDING=window is not None, FP8=fp8,
    )
    return out


__all__ = ["paged_prefill_attention"]
