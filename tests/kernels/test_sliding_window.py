"""Sliding-window attention (a query at position p sees keys at positions p - window < j <= p, as transformers'
Mistral): the torch reference backend against a dense softmax written out here, and the Triton decode (split-KV)
and prefill kernels against the torch backend, with windows shorter than, equal to and longer than the contexts."""
from __future__ import annotations

import pytest
import torch

import engine_svc.kernels.paged_decode_attention as decode_module
from engine_svc.attention import TorchPagedAttention
from engine_svc.attention.triton_backend import TritonPagedAttention
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.paged import LaunchCounter, make_batch

GQA = [(4, 4), (4, 1)]              # (heads, kv_heads): group sizes 1 and 4
DECODE_SEQ_LENS = [1, 7, 33, 70, 16]
# Prompts, a decode row, chunks over a cached prefix (21 + 19, 30 + 20), a prompt of exactly one block.
PREFILL_Q_LENS, PREFILL_SEQ_LENS = [4, 1, 19, 9, 20, 4], [4, 21, 40, 9, 50, 4]


def dense_reference(batch, window: int | None) -> torch.Tensor:
    """Per sequence and head: keys/values read back slot by slot through the block table, the mask built from
    positions, softmax(q k^T * scale) v without any library attention."""
    m, cache = batch.meta, batch.kv_cache
    heads, kv_heads = batch.q.shape[1], cache.shape[3]
    group = heads // kv_heads
    out = torch.empty_like(batch.q)
    row = 0
    for i, (q_len, seq_len) in enumerate(zip(m.query_lens_cpu, m.seq_lens_cpu)):
        table = m.block_tables[i].tolist()
        slots = [table[p // m.block_size] * m.block_size + p % m.block_size for p in range(seq_len)]
        flat = cache.view(2, -1, kv_heads, cache.shape[-1]).double()
        k, v = flat[0, slots], flat[1, slots]                   # [seq_len, kv_heads, head_dim]
        for t in range(q_len):
            p = seq_len - q_len + t
            keys = [j for j in range(seq_len) if j <= p and (window is None or j > p - window)]
            for h in range(heads):
                scores = (k[keys, h // group] @ batch.q[row + t, h].double()) * batch.scale
                out[row + t, h] = (torch.softmax(scores, 0) @ v[keys, h // group]).to(out.dtype)
        row += q_len
    return out



@pytest.mark.parametrize("window", [None, 1, 3, 8, 33, 100])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_torch_backend_matches_dense_softmax(heads, kv_heads, window):
    mixed = make_batch(PREFILL_Q_LENS, PREFILL_SEQ_LENS, num_heads=heads, kv_heads=kv_heads, seed=3)
    decode = make_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, num_heads=heads, kv_heads=kv_heads, seed=4)
    for batch in (mixed, decode):
        out = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale, window=window)
        torch.testing.assert_close(out, dense_reference(batch, window), rtol=1e-5, atol=1e-5)


def test_window_one_is_the_value_of_the_own_position():
    batch = make_batch([3, 1], [10, 6], num_heads=2, kv_heads=1, seed=5)
    out = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale, window=1)
    m = batch.meta
    own = []
    for i, (q_len, seq_len) in enumerate(zip(m.query_lens_cpu, m.seq_lens_cpu)):
        for p in range(seq_len - q_len, seq_len):
            slot = m.block_tables[i, p // m.block_size].item() * m.block_size + p % m.block_size
            own.append(batch.kv_cache.view(2, -1, 1, 16)[1, slot])
    torch.testing.assert_close(out, torch.stack(own).expand_as(out), rtol=1e-6, atol=1e-6)


def run_decode(batch, window, max_seq_len=None, **kw):
    m = batch.meta
    return paged_decode_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max_seq_len or max(m.seq_lens_cpu), window=window, **kw)


@pytest.mark.parametrize("window", [1, 5, 16, 33, 70, 200])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_split_kv_decode_with_window(device, monkeypatch, heads, kv_heads, window):
    # 16-key splits and tiles over 4-key blocks: the window starts mid-block and mid-split; 16 and 33 equal a
    # context, 70 the longest, 200 exceeds them all.
    batch = make_batch([1] * len(DECODE_SEQ_LENS), DECODE_SEQ_LENS, num_heads=heads, kv_heads=kv_heads,
                       device=device, seed=window + heads)
    main = LaunchCounter(decode_module._decode_kernel)
    monkeypatch.setattr(decode_module, "_decode_kernel", main)
    out = run_decode(batch, window, partition_size=16, block_n=16)
    # The splits tile the window, not the whole context: none lies wholly before it.
    assert main.grids == [(len(DECODE_SEQ_LENS), kv_heads, -(-min(70, window) // 16))]
    ref = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale, window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_with_window_and_graph_wide_bound(device):
    """As under a CUDA graph: max_seq_len is max_model_len (far above every context), with and without a split."""
    batch = make_batch([1] * 4, [3, 45, 100, 17], num_heads=4, kv_heads=2, block_size=8, device=device, seed=9,
                       extra_table_cols=20)
    ref = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale, window=20)
    for partition in (16, None):
        out = run_decode(batch, 20, max_seq_len=256, partition_size=partition, block_n=16)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 9, 20, 64])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_prefill_with_window(device, heads, kv_heads, window):
    # 32 packed rows x 16-key tiles: with group 1 a program spans 32 positions, more than the small windows, so
    # some rows see nothing in the program's first tiles; 9 and 20 equal a context, 64 exceeds them all.
    batch = make_batch(PREFILL_Q_LENS, PREFILL_SEQ_LENS, num_heads=heads, kv_heads=kv_heads, device=device,
                       seed=window * 3 + heads)
    m = batch.meta
    out = paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max(m.query_lens_cpu), block_m=32, block_n=16,
                                  window=window)
    ref = TorchPagedAttention().forward(batch.q, batch.kv_cache, m, batch.scale, window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_prefill_with_window_default_tiles(device):
    # The default 64-row, 64-key tiles: the window is far below one tile.
    batch = make_batch([70, 5], [90, 70], num_heads=4, kv_heads=2, block_size=16, device=device, seed=21)
    m = batch.meta
    out = paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max(m.query_lens_cpu), window=5)
    ref = TorchPagedAttention().forward(batch.q, batch.kv_cache, m, batch.scale, window=5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens,seq_lens", [([4, 1, 6, 1], [4, 21, 30, 9]), ([1, 1, 1], [3, 37, 20])],
                         ids=["mixed", "decode"])
def test_triton_backend_passes_the_window(device, q_lens, seq_lens):
    batch = make_batch(q_lens, seq_lens, num_heads=6, kv_heads=2, device=device, seed=13)
    out = TritonPagedAttention(decode_partition_size=16).forward(batch.q, batch.kv_cache, batch.meta, batch.scale,
                                                                 window=6)
    ref = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale, window=6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    full = TorchPagedAttention().forward(batch.q, batch.kv_cache, batch.meta, batch.scale)
    assert not torch.allclose(out, full, atol=1e-3)   # the window changed something
