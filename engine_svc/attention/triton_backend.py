"""Paged attention with Triton kernels (engine_svc.kernels), numerically equivalent to TorchPagedAttention.

A batch of decode rows only (one new token per sequence) goes to the split-KV decode kernel; any batch with a
prefill or chunk goes to the prefill kernel, which handles its q_len == 1 rows as well. Both take the sliding
window (a query at position p sees keys at positions > p - window), and an fp8 cache with its kv_scales.
"""
from __future__ import annotations

import torch

from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention


class TritonPagedAttention:
    name = "triton"

    def __init__(self, decode_partition_size: int | None = None) -> None:
        # Keys per decode split; None lets the decode kernel choose from the batch shape and the GPU.
        self.decode_partition_size = decode_partition_size

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        write_kv(k, v, kv_cache, meta.slot_mapping, kv_scales=kv_scales)

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
