"""The online-softmax step shared by the paged attention kernels: one tile of BLOCK_N keys/values of one KV head,
gathered through a sequence's block table, folded into running (acc, m, l) for a tile of query rows.

Scores are kept in the log2 domain (scale_log2 = softmax scale * log2(e)) so exp2 can be used; m is the running row
max of those scores, l the running sum of exp2(score - m), acc the running sum of exp2(score - m) * v, all fp32.
"""
from __future__ import annotations

from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs would otherwise go through TF32 tensor cores on NVIDIA GPUs; 16-bit inputs use the default.
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def attend_tile(acc, m, l, q, k_base, v_base, table_ptr, start, kv_end, q_pos,
                block_size, stride_cache_block, stride_cache_tok, head_dim, scale_log2, window,
                CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                SLIDING: tl.constexpr = False):
    """Keys at positions start .. start+BLOCK_N-1 that are < kv_end are read; with CAUSAL, row r only sees keys at
    positions <= q_pos[r], and with SLIDING as well only keys at positions > q_pos[r] - window. Without CAUSAL the
    caller guarantees every key of the tile is visible to every row (window is then unused).
    Without SLIDING, every row must see at least one key over the tiles folded so far, or m stays -inf and the
    next tile turns it into NaN (the callers order tiles so that position 0, or the first position of a partition,
    comes first). With SLIDING a row may see nothing in its first tiles: its max is then kept -inf and the rescale
    guarded, so the row starts accumulating at its first visible key."""
    k_pos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    in_ctx = k_pos < kv_end
    # Logical position -> physical block through the block table; any block size works, a tile may span blocks.
    block = tl.load(table_ptr + k_pos // block_size, mask=in_ctx, other=0).to(tl.int64)
    offs = block[:, None] * stride_cache_block + (k_pos % block_size)[:, None] * stride_cache_tok + d[None, :]
    kv_mask = in_ctx[:, None] & (d < head_dim)[None, :]
    # An fp8 (e4m3) cache converts exactly: every e4m3 value is an fp16, bf16 and fp32 value. Its scales are the
    # callers' to apply (folded into scale_log2 and the output).
    k = tl.load(k_base + offs, mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_base + offs, mask=kv_mask, other=0.0).to(q.dtype)

    s = dot(q, tl.trans(k), IEEE) * scale_log2                     # [rows, BLOCK_N] fp32
    if CAUSAL:
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_ctx[None, :]
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if SLIDING:
        # A row that has seen no key yet (m_new = -inf) gets p = 0 and alpha = 0 instead of NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
    else:
        alpha = tl.exp2(m - m_new)                                   # 0 on the first tile (m = -inf)
        p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l
