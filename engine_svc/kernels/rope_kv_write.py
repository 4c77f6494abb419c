"""RoPE and the KV cache write in one launch: q rotated in place, rope(k) and v stored into their cache slots.

The same arithmetic as apply_rope (rope.py) followed by write_kv (kv_write.py), bit for bit: k is rotated in fp32
through rope.rotate_halves and rounded to the activation dtype, exactly what apply_rope stores and write_kv then
reads, before the cast (or, for an fp8 cache, the scaled e4m3 quantization of kv_write._to_e4m3_range) into the
cache dtype. What changes is the traffic: one launch per layer instead of two, and the rotated k goes straight from
registers into the cache instead of through a round trip to memory. k itself is only read (it stays unrotated):
after this step nothing reads it but the cache.

Grid: (num_tokens,); a program rotates every query head of one token and writes all its KV heads (K and V) into
slot slot_mapping[t] of the cache [2, num_blocks, block_size, kv_heads, head_dim]. A negative slot marks a padding
token that owns no slot: its q is still rotated, nothing is written to the cache.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels.kv_scales import check_scales
from engine_svc.kernels.kv_write import _to_e4m3_range   # also routes the interpreter's fp8 casts through torch
from engine_svc.kernels.rope import _rotate_heads, rope_cos_sin, rotate_halves


@triton.jit
def _to_cache(x, scale, cache_dtype: tl.constexpr, FP8: tl.constexpr):
    if FP8:
        x = _to_e4m3_range(x, scale)
    return x.to(cache_dtype)


@triton.jit
def _rope_kv_write_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, kv_scales_ptr,
    num_q_heads, num_kv_heads, half, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_cache_kv, stride_cache_block, stride_cache_tok, stride_cache_head,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = rope_cos_sin(pos_ptr, cos_ptr, sin_ptr, t, half, stride_cs, q_ptr.dtype.element_ty, BLOCK_HALF)
    _rotate_heads(q_ptr + t * stride_qt, q_ptr + t * stride_qt, stride_qh, stride_qh, num_q_heads, half, cos, sin,
                  BLOCK_QH, BLOCK_HALF)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_KH)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    slots = tl.zeros([BLOCK_KH, BLOCK_HALF], tl.int64) + slot
    mask = (h < num_kv_heads) & (j < half) & (slots >= 0)
    dst = cache_ptr + (slots // block_size) * stride_cache_block + (slots % block_size) * stride_cache_tok \
        + h * stride_cache_head + j
    k_scale = 1.0
    v_scale = 1.0
    if FP8:
        k_scale = tl.load(kv_scales_ptr)
        v_scale = tl.load(kv_scales_ptr + 1)
    cache_dtype = cache_ptr.dtype.element_ty
    k1, k2 = rotate_halves(k_ptr + t * stride_kt, h * stride_kh, j, mask, half, cos, sin, k_ptr.dtype.element_ty)
    tl.store(dst, _to_cache(k1, k_scale, cache_dtype, FP8), mask=mask)
    tl.store(dst + half, _to_cache(k2, k_scale, cache_dtype, FP8), mask=mask)
    v_row = v_ptr + t * stride_vt + h * stride_vh + j
    v1 = tl.load(v_row, mask=mask)
    v2 = tl.load(v_row + half, mask=mask)
    tl.store(dst + stride_cache_kv, _to_cache(v1, v_scale, cache_dtype, FP8), mask=mask)
    tl.store(dst + stride_cache_kv + half, _to_cache(v2, v_scale, cache_dtype, FP8), mask=mask)


def rope_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """positions [T]; q [T, heads, head_dim], k and v [T, kv_heads, head_dim] (any strides, contiguous last dim:
    views of a fused qkv); cos/sin [max_positions, head_dim] (RotaryEmbedding's tables); kv_cache
    [2, num_blocks, block_size, kv_heads, head_dim]; slot_mapping [T] int64 (negative: no slot); kv_scales float32
    [2] (K, V) for an fp8 cache, None otherwise. Rotates q in place and returns it; k is not written."""
    fp8 = check_scales(kv_cache, kv_scales)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape \
            or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(f"rope_write_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and cache "
                         f"{tuple(kv_cache.shape)} disagree (or head_dim is odd)")
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(4) == 1, \
        "head_dim must be contiguous"
    assert cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    _rope_kv_write_kernel[(num_tokens,)](
        positions, q, k, v, cos, sin, kv_cache, slot_mapping, kv_scales if fp8 else slot_mapping,
        num_q_heads, num_kv_heads, half, kv_cache.shape[2],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), FP8=fp8,
    )
    return q


__all__ = ["rope_write_kv"]
