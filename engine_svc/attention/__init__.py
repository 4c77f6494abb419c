"""Attention backends over the paged KV cache, behind one interface (write_kv + forward over AttentionMetadata):
`torch` is the reference and the CPU path, `triton` the GPU kernels (imported only when chosen, so this package
works without triton installed)."""
from __future__ import annotations

from typing import Callable

from engine_svc.attention.backend import AttentionBackend
from engine_svc.attention.kv_cache import KVCache
from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.attention.torch_backend import TorchPagedAttention


def _triton() -> AttentionBackend:
    from engine_svc.attention.triton_backend import TritonPagedAttention
    return TritonPagedAttention()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchPagedAttention, "triton": _triton}


def get_backend(name: str, device_type: str = "cpu") -> AttentionBackend:
    """name "auto" picks triton on CUDA and the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    factory = _BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return factory()


__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "TorchPagedAttention", "get_backend"]
