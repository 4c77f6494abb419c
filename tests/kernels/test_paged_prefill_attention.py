"""The prefill kernel against TorchPagedAttention: ragged batches mixing whole prompts, chunks over a cached prefix
and single decode rows, GQA ratios 1, 3 and 4, block sizes 4 and 16, tiles smaller than the sequences."""
from __future__ import annotations

import pytest
import torch

from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.paged import make_batch

GQA = [(2, 2), (6, 2), (4, 1)]   # (heads, kv_heads): group sizes 1, 3, 4
# Whole prompt; 3-token chunk after a 10-token cached prefix; a decode row; a 17-token chunk after 23 cached
# tokens (crossing 16-row/16-key tiles and blocks); a 2-token prompt.
Q_LENS = [5, 3, 1, 17, 2]
SEQ_LENS = [5, 13, 9, 40, 2]


def run(batch, **kw):
    m = batch.meta
    return paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                   m.block_size, batch.scale, max(m.query_lens_cpu), **kw)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_ragged_batch_with_cached_prefixes(device, heads, kv_heads, block_size):
    batch = make_batch(Q_LENS, SEQ_LENS, num_heads=heads, kv_heads=kv_heads, block_size=block_size, device=device,
                       seed=heads * 10 + block_size)
    torch.testing.assert_close(run(batch, block_m=16, block_n=16), batch.reference(), rtol=1e-5, atol=1e-5)


def test_default_tiles_odd_head_dim_and_strided_block_table(device):
    # head_dim 24 pads to 32 lanes; the block table is a column slice of a wider tensor.
    batch = make_batch([70, 4], [70, 90], num_heads=6, kv_heads=2, head_dim=24, block_size=8, device=device,
                       seed=3, extra_table_cols=5)
    torch.testing.assert_close(run(batch), batch.reference(), rtol=1e-5, atol=1e-5)


def test_decode_rows_only(device):
    batch = make_batch([1, 1, 1], [1, 18, 33], num_heads=4, kv_heads=1, block_size=4, device=device, seed=5)
    torch.testing.assert_close(run(batch, block_m=16, block_n=16), batch.reference(), rtol=1e-5, atol=1e-5)
