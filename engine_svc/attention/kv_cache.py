"""One layer's paged KV cache and its storage formats (`--kv-cache-dtype`).

`auto` stores keys and values in the model dtype. `fp8` stores them as float8 e4m3 (torch.float8_e4m3fn, Triton's
tl.float8e4nv: 1 byte, half of bf16), with one float32 scale for K and one for V per layer:

    stored = e4m3(clamp(x / scale, -448, 448))      (round to nearest even; 448 is e4m3's largest finite value)
    x     ~= float(stored) * scale

Every backend and kernel uses exactly this arithmetic; the scales are a device tensor [2] (K, V) that the kernels
read, so captured CUDA graphs stay valid whatever values it holds (they may be overwritten in place).

Scale policy: static, 1.0 for every layer. e4m3 keeps a constant relative precision (3 mantissa bits: a rounding
error of at most 2^-4 of the value) over its whole normal range 2^-6 .. 448, so a scale only changes anything for
values beyond 448 (clamped) or far below 2^-6 (subnormal). Keys and values after the K/V projections (and RoPE)
of common models are of order 1 to 10: far from both ends, where a scale would buy no precision. A model with
outliers past 448 needs calibrated scales (e.g. a checkpoint's k_scale/v_scale), written into `scales`; none are
loaded yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0            # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_FP8_SCALE = 1.0


@dataclass(frozen=True)
class KVCache:
    data: torch.Tensor                   # [2, num_blocks, block_size, kv_heads, head_dim] in the cache dtype
    scales: torch.Tensor | None = None   # [2] float32 (K scale, V scale) when data is fp8, else None


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of `--kv-cache-dtype` (auto: the model dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8":
        return FP8_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; available: auto, fp8")


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> list[KVCache]:
    """Zeroed caches, one per layer; an fp8 cache gets its own scales tensor holding DEFAULT_FP8_SCALE."""
    return [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                    torch.full((2,), DEFAULT_FP8_SCALE, dtype=torch.float32, device=device)
                    if dtype == FP8_DTYPE else None)
            for _ in range(num_layers)]


def check_scales(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> bool:
    """True when kv_cache is fp8 (and then kv_scales is a float32 [2] tensor on its device); raises on a mismatch."""
    if kv_cache.dtype != FP8_DTYPE:
        if kv_scales is not None:
            raise ValueError(f"kv_scales given for a {kv_cache.dtype} KV cache: only an fp8 cache is scaled")
        return False
    if kv_scales is None:
        raise ValueError("an fp8 KV cache needs kv_scales (float32 [2]: K scale, V scale)")
    if kv_scales.shape != (2,) or kv_scales.dtype != torch.float32 or kv_scales.device != kv_cache.device:
        raise ValueError(f"kv_scales must be float32 [2] on {kv_cache.device}, got {kv_scales.dtype} "
                         f"{tuple(kv_scales.shape)} on {kv_scales.device}")
    return True


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale)) with x / scale computed in float32 (the kernels divide in float32 too)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (stored.float() * scale).to(dtype)
