"""The scales argument of an fp8 paged KV cache, as every attention backend and kernel takes it."""
from __future__ import annotations

import torch

from engine_svc.kernels.fp8_numerics import E4M3


def check_scales(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> bool:
    """True when kv_cache is fp8 (and then kv_scales is a float32 [2] tensor on its device); raises on a mismatch."""
    if kv_cache.dtype != E4M3:
        if kv_scales is not None:
            raise ValueError(f"kv_scales given for a {kv_cache.dtype} KV cache: only an fp8 cache is scaled")
        return False
    if kv_scales is None:
        raise ValueError("an fp8 KV cache needs kv_scales (float32 [2]: K scale, V scale)")
    if kv_scales.shape != (2,) or kv_scales.dtype != torch.float32 or kv_scales.device != kv_cache.device:
        raise ValueError(f"kv_scales must be float32 [2] on {kv_cache.device}, got {kv_scales.dtype} "
                         f"{tuple(kv_scales.shape)} on {kv_scales.device}")
    return True
