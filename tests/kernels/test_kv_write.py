"""The KV write kernel against TorchPagedAttention.write_kv: scattered slots, views of a fused qkv tensor, padding
slots skipped."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import AttentionMetadata, TorchPagedAttention
from engine_svc.kernels.kv_write import write_kv


def meta_for(slots: torch.Tensor, block_size: int) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=slots, block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             seq_lens=torch.zeros(1, dtype=torch.int32), query_start=torch.zeros(2, dtype=torch.int32),
                             query_lens_cpu=[0], seq_lens_cpu=[0], block_size=block_size)


@pytest.mark.parametrize("block_size", [4, 16])
def test_scattered_slots_from_fused_qkv_views(device, block_size):
    g = torch.Generator().manual_seed(block_size)
    num_blocks, kv_heads, head_dim, tokens = 9, 2, 16, 23
    # k and v are strided views into one [tokens, q + k + v] projection, as LlamaAttention produces them.
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=g).to(device)
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(device)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(device)
    expected = cache.clone()
    TorchPagedAttention().write_kv(k, v, expected, meta_for(slots, block_size))
    write_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


def test_negative_slots_are_skipped(device):
    cache = torch.zeros(2, 3, 4, 1, 16, device=device)
    k = torch.ones(3, 1, 16, device=device)
    write_kv(k, 2 * k, cache, torch.tensor([5, -1, 0], device=device))
    flat = cache.view(2, -1, 16)
    assert flat[0, [0, 5]].eq(1).all() and flat[1, [0, 5]].eq(2).all()
    assert flat[:, [i for i in range(12) if i not in (0, 5)]].eq(0).all()
