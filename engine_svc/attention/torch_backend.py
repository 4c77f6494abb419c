"""Reference paged attention in plain torch. Runs anywhere (the CPU path) and is what faster backends are tested
against. Decode rows are attended in one padded SDPA call, also when the batch mixes them with prefill chunks;
sequences with several new tokens (prefill) are attended one by one.

An fp8 cache (kv_scales given) is written and read with the arithmetic of engine_svc.kernels.fp8_numerics: keys and
values are dequantized to q's dtype before attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_svc.attention.backend import Rope, rope_then_write_kv
from engine_svc.attention.kv_cache import KVCache
from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.kernels.fp8_numerics import dequantize_fp8, quantize_fp8
from engine_svc.kernels.kv_scales import check_scales


class TorchPagedAttention:
    name = "torch"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: torch.Tensor | None = None) -> None:
        kv_heads, head_dim = k.shape[1], k.shape[2]
        flat = kv_cache.view(2, -1, kv_heads, head_dim)
        if check_scales(kv_cache, kv_scales):
            # Copied as bytes: index_copy_ has no float8 kernel on the CPU.
            flat = flat.view(torch.uint8)
            k, v = quantize_fp8(k, kv_scales[0]).view(torch.uint8), quantize_fp8(v, kv_scales[1]).view(torch.uint8)
        flat[0].index_copy_(0, meta.slot_mapping, k.to(flat.dtype))
        flat[1].index_copy_(0, meta.slot_mapping, v.to(flat.dtype))

    def rope_and_write_kv(self, rope: Rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return rope_then_write_kv(self, rope, positions, q, k, v, kv_cache, meta)

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        if window is not None and window <= 0:
            raise ValueError(f"sliding window must be positive, got {window}")
        check_scales(kv_cache, kv_scales)
        if meta.is_pure_decode:
            return self._decode(q, kv_cache, kv_scales, meta.block_tables, meta.seq_lens, meta.seq_lens_cpu,
                                meta.block_size, scale, window)
        # A mixed batch (decodes next to prefill chunks): the decode rows still go through one batched call.
        out = torch.empty_like(q)
        decode_seqs, decode_rows = [], []
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if q_len == 1:
                decode_seqs.append(i)
                decode_rows.append(start)
            else:
                out[start:start + q_len] = self._one_sequence(q[start:start + q_len], kv_cache, kv_scales, meta, i,
                                                              seq_len, scale, window)
            start += q_len
        if decode_seqs:
            seqs = torch.tensor(decode_seqs, device=q.device)
            rows = torch.tensor(decode_rows, device=q.device)
            out[rows] = self._decode(q[rows], kv_cache, kv_scales, meta.block_tables[seqs], meta.seq_lens[seqs],
                                     [meta.seq_lens_cpu[i] for i in decode_seqs], meta.block_size, scale, window)
        return out

    def _gather(self, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, blocks: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # kv_cache[:, blocks] -> [2, *blocks.shape, block_size, kv_heads, head_dim], in dtype. index_select over
        # whole blocks copies the same values as that indexing, several times faster on the CPU (9 vs 40 µs a
        # layer at batch 1); an fp8 cache is copied as bytes (no float8 index_select kernel on the CPU).
        flat = kv_cache.flatten(2)
        flat = flat.view(torch.uint8) if kv_scales is not None else flat
        kv = flat.index_select(1, blocks.reshape(-1)).view(kv_cache.dtype).view(2, *blocks.shape,
                                                                               *kv_cache.shape[2:])
        if kv_scales is None:
            return kv[0].to(dtype), kv[1].to(dtype)
        return dequantize_fp8(kv[0], kv_scales[0], dtype), dequantize_fp8(kv[1], kv_scales[1], dtype)

    def _one_sequence(self, q: torch.Tensor, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None,
                      meta: AttentionMetadata, i: int, seq_len: int, scale: float, window: int | None) -> torch.Tensor:
        q_len = q.shape[0]
        num_blocks = -(-seq_len // meta.block_size)
        k, v = self._gather(kv_cache, kv_scales, meta.block_tables[i, :num_blocks].long(), q.dtype)
        k = k.reshape(-1, *k.shape[-2:])[:seq_len]          # [seq_len, kv_heads, head_dim]
        v = v.reshape(-1, *v.shape[-2:])[:seq_len]
        # Query row r sits at position seq_len - q_len + r and sees keys at positions <= its own (and, with a
        # window, > its own - window).
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = k_pos <= q_pos[:, None]
        if window is not None:
            mask &= k_pos > q_pos[:, None] - window
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: list[int], block_size: int,
                scale: float, window: int | None) -> torch.Tensor:
        max_len = max(seq_lens_cpu)
        num_blocks = -(-max_len // block_size)
        k, v = self._gather(kv_cache, kv_scales, block_tables[:, :num_blocks].long(), q.dtype)
        b = q.shape[0]
        k = k.reshape(b, -1, *k.shape[-2:])[:, :max_len]      # [B, L, kv_heads, head_dim]
        v = v.reshape(b, -1, *v.shape[-2:])[:, :max_len]
        # The device's seq_lens hold the true lengths: in a graph-shaped step seq_lens_cpu holds the graph's bound
        # (max_model_len) for every row, so a mask is always built from the device's values.
        k_pos = torch.arange(max_len, device=q.device)[None, :]
        mask = k_pos < seq_lens[:, None]
        if window is not None:   # the query sits at seq_len - 1 and sees keys > seq_len - 1 - window
            mask &= k_pos >= seq_lens[:, None] - window
        mask = mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        return o[:, :, 0, :]
