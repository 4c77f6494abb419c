"""One layer's paged KV cache and its storage formats (`--kv-cache-dtype`).

`auto` stores keys and values in the model dtype. `fp8` stores them as float8 e4m3 (1 byte, half of bf16), with
one float32 scale for K and one for V per layer:

    stored = e4m3(clamp(x / scale, -448, 448))      (round to nearest even; 448 is e4m3's largest finite value)
    x     ~= float(stored) * scale

Every backend and kernel uses exactly this arithmetic (engine_svc.kernels.fp8_numerics) and takes the scales as
engine_svc.kernels.kv_scales.check_scales accepts them: a device tensor [2] (K, V) that the kernels read, so
captured CUDA graphs stay valid whatever values it holds (they may be overwritten in place).

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

from engine_svc.kernels.fp8_numerics import E4M3

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
        return E4M3
    raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; available: auto, fp8")


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> list[KVCache]:
    """Zeroed caches, one per layer; an fp8 cache gets its own scales tensor holding DEFAULT_FP8_SCALE."""
    return [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                    torch.full((2,), DEFAULT_FP8_SCALE, dtype=torch.float32, device=device)
                    if dtype == E4M3 else None)
            for _ in range(num_layers)]

