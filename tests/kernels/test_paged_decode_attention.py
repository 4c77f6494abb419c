"""The split-KV decode kernel against TorchPagedAttention, with and without splitting the context, and the
choice of split size."""
from __future__ import annotations

import pytest
import torch
import triton

import engine_svc.kernels.paged_decode_attention as decode_module
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.paged import LaunchCounter, make_batch

GQA = [(2, 2), (6, 2), (4, 1)]   # (heads, kv_heads): group sizes 1, 3, 4
SEQ_LENS = [1, 7, 33, 70, 16]    # ragged; the longest spans 5 splits of 16 keys



def run(batch, **kw):
    m = batch.meta
    return paged_decode_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max(m.seq_lens_cpu), **kw)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_split_kv_matches_reference(device, monkeypatch, heads, kv_heads, block_size):
    batch = make_batch([1] * len(SEQ_LENS), SEQ_LENS, num_heads=heads, kv_heads=kv_heads, block_size=block_size,
                       device=device, seed=heads * 10 + block_size)
    reduce = LaunchCounter(decode_module._reduce_kernel)
    monkeypatch.setattr(decode_module, "_reduce_kernel", reduce)
    out = run(batch, partition_size=16, block_n=16)
    assert reduce.grids == [(len(SEQ_LENS), heads)]   # the context really was split and recombined
    torch.testing.assert_close(out, batch.reference(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 1)])
def test_single_split_matches_reference(device, monkeypatch, heads, kv_heads):
    batch = make_batch([1] * len(SEQ_LENS), SEQ_LENS, num_heads=heads, kv_heads=kv_heads, block_size=4,
                       device=device, seed=1)
    reduce = LaunchCounter(decode_module._reduce_kernel)
    monkeypatch.setattr(decode_module, "_reduce_kernel", reduce)
    out = run(batch, partition_size=128, block_n=32)
    assert reduce.grids == []   # one split writes the output directly
    torch.testing.assert_close(out, batch.reference(), rtol=1e-5, atol=1e-5)


def test_uneven_splits_and_strided_block_table(device):
    # Partition 32 with 16-key tiles: the last split of each sequence is partial, and short sequences leave
    # trailing splits empty, which the reduction must ignore.
    batch = make_batch([1, 1, 1], [100, 3, 45], num_heads=6, kv_heads=2, head_dim=24, block_size=16,
                       device=device, seed=2, extra_table_cols=3)
    torch.testing.assert_close(run(batch, partition_size=32, block_n=16), batch.reference(), rtol=1e-5,
                               atol=1e-5)


def test_decode_and_prefill_kernels_agree(device):
    batch = make_batch([1] * 4, [5, 40, 17, 64], num_heads=4, kv_heads=2, block_size=8, device=device, seed=4)
    m = batch.meta
    prefill = paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                      m.block_size, batch.scale, 1, block_m=16, block_n=16)
    torch.testing.assert_close(run(batch, partition_size=16, block_n=16), prefill, rtol=1e-5, atol=1e-5)


def test_partition_size_choice(monkeypatch):
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setitem(decode_module._NUM_SMS, 0, 132)
    choose = decode_module.default_partition_size
    # One sequence, 8 KV heads, 32k context: between one and two programs per SM.
    size = choose(32768, 1, 8, cuda0)
    assert size % decode_module.BLOCK_N == 0
    assert 132 <= 8 * triton.cdiv(32768, size) <= 2 * 132
    # Enough (sequence, KV head) programs already, short contexts, or no GPU: no split.
    assert choose(32768, 32, 8, cuda0) is None
    assert choose(decode_module.MIN_PARTITION, 1, 1, cuda0) is None
    assert choose(32768, 1, 8, torch.device("cpu")) is None
    # Never below MIN_PARTITION keys per split.
    assert choose(1000, 1, 1, cuda0) >= decode_module.MIN_PARTITION
