"""The seam between the model and an attention implementation."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from engine_svc.attention.kv_cache import KVCache
from engine_svc.attention.metadata import AttentionMetadata

# A rotary embedding as the backends take it (engine_svc.models.layers.RotaryEmbedding): rope(positions, q, k)
# returns the rotated (q, k); a backend that fuses RoPE into its cache write also reads its cos/sin tables and
# `fused` (whether the model runs the Triton kernels' RoPE arithmetic).
Rope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        """Stores new keys/values [num_tokens, kv_heads, head_dim] into their slots of kv_cache
        [2, num_blocks, block_size, kv_heads, head_dim]. An fp8 cache needs kv_scales (float32 [2]: K, V) and
        stores the quantized values (engine_svc.attention.kv_cache); any other cache takes none."""

    def rope_and_write_kv(self, rope: Rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """RoPE on q and k, then write_kv(rotated k, v) into kv_cache; returns the rotated q. A backend may fuse the
        two into one pass and leave k itself unrotated (nothing reads it after the cache write)."""

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of q [num_tokens, heads, head_dim] over each sequence's cached context (which already
        holds this step's keys/values); returns [num_tokens, heads, head_dim]. With a window, a query at position
        p sees only keys at positions > p - window. An fp8 cache is dequantized with kv_scales."""


def rope_then_write_kv(backend: AttentionBackend, rope: Rope, positions: torch.Tensor, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
    """rope_and_write_kv as two steps: the rope's own forward, then the backend's write_kv."""
    q, k = rope(positions, q, k)
    backend.write_kv(k, v, kv_cache.data, meta, kv_scales=kv_cache.scales)
    return q
