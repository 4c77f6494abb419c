"""Rotary position embedding (NeoX / HF Llama "rotate half" layout) applied to q and k in one launch.

Grid: (num_tokens,); a program rotates every query and key head of one token, reading the cos/sin rows of its
position from the tables RotaryEmbedding builds ([max_positions, head_dim], both halves equal; only the first half
is read). For dimension j < half: out[j] = x[j] cos - x[j + half] sin, out[j + half] = x[j + half] cos + x[j] sin.
cos/sin are rounded to the activation dtype first, like layers.RotaryEmbedding; the products are fp32.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl


@triton.jit
def rope_cos_sin(pos_ptr, cos_ptr, sin_ptr, t, half, stride_cs, act_dtype: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """The [1, BLOCK_HALF] cos and sin rows of token t's position, rounded to act_dtype then widened to fp32."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cs_mask = j < half
    cos = tl.load(cos_ptr + pos * stride_cs + j, mask=cs_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cs + j, mask=cs_mask, other=0.0)
    return cos.to(act_dtype).to(tl.float32)[None, :], sin.to(act_dtype).to(tl.float32)[None, :]


@triton.jit
def rotate_halves(x_ptr, h, j, mask, half, cos, sin, out_dtype: tl.constexpr):
    """The rotated halves (x1 cos - x2 sin, x2 cos + x1 sin) of the heads at x_ptr + h (row offsets) + j, computed
    in fp32 and rounded to out_dtype: every RoPE kernel rotates through this one expression, so they agree bitwise."""
    x1 = tl.load(x_ptr + h + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h + half + j, mask=mask, other=0.0).to(tl.float32)
    return (x1 * cos - x2 * sin).to(out_dtype), (x2 * cos + x1 * sin).to(out_dtype)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xh, stride_oh, num_heads, half, cos, sin,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < half)
    o1, o2 = rotate_halves(x_ptr, h * stride_xh, j, mask, half, cos, sin, o_ptr.dtype.element_ty)
    tl.store(o_ptr + h * stride_oh + j, o1, mask=mask)
    tl.store(o_ptr + h * stride_oh + half + j, o2, mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, num_q_heads, num_k_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = rope_cos_sin(pos_ptr, cos_ptr, sin_ptr, t, half, stride_cs, q_ptr.dtype.element_ty, BLOCK_HALF)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, num_q_heads, half,
                  cos, sin, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh, num_k_heads, half,
                  cos, sin, BLOCK_KH, BLOCK_HALF)


def apply_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; q [T, heads, head_dim], k [T, kv_heads, head_dim] (any strides, contiguous last dim);
    cos/sin [max_positions, head_dim]. Returns the rotated (q, k): q and k themselves when inplace."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert head_dim % 2 == 0 and q.stride(2) == 1 and k.stride(2) == 1
    assert cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        positions, q, k, q_out, k_out, cos, sin, num_q_heads, num_k_heads, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return q_out, k_out


__all__ = ["apply_rope"]
