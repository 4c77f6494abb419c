"""Paged attention with Triton kernels (engine_svc.kernels), numerically equivalent to TorchPagedAttention.

A batch of decode rows only (one new token per sequence) goes to the split-KV decode kernel; any batch with a
prefill or chunk goes to the prefill kernel, which handles its q_len == 1 rows as well. Both take the sliding
window (a query at position p sees keys at positions > p - window), and an fp8 cache with its kv_scales.

RoPE and the cache write run as one kernel (rope_kv_write: one launch per layer instead of two, the same bits);
fuse_rope_kv_write=False keeps the two launches (the rope kernel, then kv_write), for comparisons.
"""
from __future__ import annotations

import torch

from engine_svc.attention.backend import Rope, rope_then_write_kv
from engine_svc.attention.kv_cache import KVCache
from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from engine_svc.kernels.rope_kv_write import rope_write_kv


class TritonPagedAttention:
    name = "triton"

    def __init__(self, decode_partition_size: int | None = None, fuse_rope_kv_write: bool = True) -> None:
        # Keys per decode split; None lets the decode kernel choose from the batch shape and the GPU.
        self.decode_partition_size = decode_partition_size
        self.fuse_rope_kv_write = fuse_rope_kv_write

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        write_kv(k, v, kv_cache, meta.slot_mapping, kv_scales=kv_scales)

    def rope_and_write_kv(self, rope: Rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        # Fused only when the model's RoPE is the Triton kernel's arithmetic (fp32, rounded once): the torch rope
        # rounds differently in half precision, and the fused kernel must equal the rope the model chose.
        if not (self.fuse_rope_kv_write and getattr(rope, "fused", False)):
            return rope_then_write_kv(self, rope, positions, q, k, v, kv_cache, meta)
        return rope_write_kv(positions, q, k, v, rope.cos, rope.sin, kv_cache.data, meta.slot_mapping,
                             kv_scales=kv_cache.scales)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        if meta.is_pure_decode:
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start,
                                          meta.block_size, scale, meta.max_seq_len or max(meta.seq_lens_cpu),
                                          partition_size=self.decode_partition_size, window=window,
                                          kv_scales=kv_scales)
        return paged_prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start,
                                       meta.block_size, scale, max(meta.query_lens_cpu), window=window,
                                       kv_scales=kv_scales)
