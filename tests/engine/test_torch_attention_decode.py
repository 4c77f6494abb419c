"""The torch attention backend's decode against attention written out by hand over each sequence's keys: one
sequence (no mask: every key is seen), sequences of different lengths (masked), an fp8 cache (gathered as bytes),
and a prefill chunk next to decode rows."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import TorchPagedAttention
from engine_svc.kernels.fp8_numerics import dequantize_fp8
from tests.kernels.paged import make_batch


def _by_hand(batch, dtype=torch.float64) -> torch.Tensor:
    """Each query row against its sequence's keys at positions up to its own, GQA heads repeated."""
    meta, cache = batch.meta, batch.kv_cache
    if batch.kv_scales is not None:
        cache = torch.stack([dequantize_fp8(cache[0], batch.kv_scales[0], torch.float32),
                             dequantize_fp8(cache[1], batch.kv_scales[1], torch.float32)])
    out, start = [], 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_tables[i, :-(-seq_len // meta.block_size)].long()
        k, v = (cache[j][blocks].reshape(-1, *cache.shape[-2:])[:seq_len].to(dtype) for j in (0, 1))
        q = batch.q[start:start + q_len].to(dtype)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * batch.scale
        positions = torch.arange(seq_len - q_len, seq_len)
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > positions[:, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += q_len
    return torch.cat(out)


@pytest.mark.parametrize("q_lens, seq_lens", [([1], [37]), ([1, 1, 1], [37, 5, 16]), ([1, 6, 1], [9, 21, 30])],
                         ids=["one-sequence", "decode-batch", "mixed"])
def test_decode_against_attention_by_hand(q_lens, seq_lens):
    batch = make_batch(q_lens, seq_lens, num_heads=6, kv_heads=2, seed=len(seq_lens))
    torch.testing.assert_close(batch.reference().double(), _by_hand(batch), rtol=1e-5, atol=1e-5)


def test_fp8_cache_is_gathered_as_its_bytes():
    batch = make_batch([1, 1], [23, 40], num_heads=4, kv_heads=4, seed=3).quantized(0.05, 0.04)
    assert batch.kv_cache.dtype != torch.float32
    torch.testing.assert_close(batch.reference().double(), _by_hand(batch), rtol=1e-4, atol=1e-4)


def test_one_sequence_gets_what_it_gets_in_a_batch():
    """The mask-free single-sequence call sees exactly the keys the masked batched call gives its row."""
    batch = make_batch([1, 1], [37, 12], num_heads=6, kv_heads=2, seed=5)
    alone = TorchPagedAttention().forward(batch.q[:1], batch.kv_cache, _first_row(batch.meta), batch.scale)
    torch.testing.assert_close(alone, batch.reference()[:1], rtol=1e-6, atol=1e-6)


def _first_row(meta):
    from dataclasses import replace
    return replace(meta, slot_mapping=meta.slot_mapping[:1], block_tables=meta.block_tables[:1],
                   seq_lens=meta.seq_lens[:1], query_start=meta.query_start[:2], query_lens_cpu=[1],
                   seq_lens_cpu=meta.seq_lens_cpu[:1])
