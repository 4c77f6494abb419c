"""Attention backends over the paged KV cache. `torch` is the reference and the CPU path; Triton comes later
behind the same interface (write_kv + forward over AttentionMetadata)."""
from __future__ import annotations

from engine_svc.attention.backend import AttentionBackend
from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.attention.torch_backend import TorchPagedAttention

_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchPagedAttention}


def get_backend(name: str) -> AttentionBackend:
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}") from None


__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention", "get_backend"]
