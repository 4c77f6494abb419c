"""The seam between the model and an attention implementation."""
from __future__ import annotations

from typing import Protocol

import torch

from engine_svc.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        """Stores new keys/values [num_tokens, kv_heads, head_dim] into their slots of kv_cache
        [2, num_blocks, block_size, kv_heads, head_dim]. An fp8 cache needs kv_scales (float32 [2]: K, V) and
        stores the quantized values (engine_svc.attention.kv_cache); any other cache takes none."""

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of q [num_tokens, heads, head_dim] over each sequence's cached context (which already
        holds this step's keys/values); returns [num_tokens, heads, head_dim]. With a window, a query at position
        p sees only keys at positions > p - window. An fp8 cache is dequantized with kv_scales."""
