"""Stores this step's new keys/values into their cache slots.

Grid: (num_tokens,); a program copies all KV heads of one token (K and V) into slot slot_mapping[t], i.e. block
slot // block_size, offset slot % block_size of the cache [2, num_blocks, block_size, kv_heads, head_dim]. A negative
slot marks a padding token that owns no slot and is skipped.

An fp8 cache (FP8) gets e4m3(clamp(x / scale, -448, 448)) with the K or V scale read from kv_scales, the arithmetic
of fp8_numerics.quantize_fp8: the division is the correctly rounded one (div_rn, as torch divides), and the
cast rounds to nearest even.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._interpreter_fp8 import use_torch_fp8_conversion_in_interpreter
from engine_svc.kernels.fp8_numerics import E4M3_MAX
from engine_svc.kernels.kv_scales import check_scales

use_torch_fp8_conversion_in_interpreter()

_E4M3_MAX: tl.constexpr = tl.constexpr(E4M3_MAX)


@triton.jit
def _to_e4m3_range(x, scale):
    x = tl.math.div_rn(x.to(tl.float32), scale)
    return tl.clamp(x, -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, kv_scales_ptr, block_size, num_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_kv, stride_cache_block, stride_cache_tok, stride_cache_head,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    slots = tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot
    mask = (h < num_heads) & (d < head_dim) & (slots >= 0)
    dst = cache_ptr + (slots // block_size) * stride_cache_block + (slots % block_size) * stride_cache_tok \
        + h * stride_cache_head + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        k = _to_e4m3_range(k, tl.load(kv_scales_ptr))
        v = _to_e4m3_range(v, tl.load(kv_scales_ptr + 1))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """k, v [num_tokens, kv_heads, head_dim] (any strides but a contiguous last dim, e.g. views of a fused qkv);
    slot_mapping [num_tokens] int64; kv_scales float32 [2] (K, V) for an fp8 cache, None otherwise."""
    fp8 = check_scales(kv_cache, kv_scales)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(4) == 1, "head_dim must be contiguous"
    _kv_write_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, kv_scales if fp8 else slot_mapping, kv_cache.shape[2], num_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim), FP8=fp8,
    )


__all__ = ["write_kv"]
