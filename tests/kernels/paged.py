"""Random paged-attention batches for the kernel tests: sequences with a cached prefix and new query tokens, their
blocks scattered over a shuffled cache, the reference output from TorchPagedAttention."""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

import torch

from engine_svc.attention import AttentionMetadata, TorchPagedAttention
from engine_svc.kernels.fp8_numerics import quantize_fp8

GARBAGE = 1e3   # unwritten cache slots hold large values, so a kernel reading one shows in its output


@dataclass
class PagedBatch:
    q: torch.Tensor          # [num_new_tokens, heads, head_dim]
    kv_cache: torch.Tensor   # every sequence's whole context already written
    meta: AttentionMetadata  # the attention step: query rows are the new tokens only
    scale: float
    kv_scales: torch.Tensor | None = None   # float32 [2] (K, V) when kv_cache is fp8

    def reference(self, window: int | None = None) -> torch.Tensor:
        return TorchPagedAttention().forward(self.q, self.kv_cache, self.meta, self.scale, window=window,
                                             kv_scales=self.kv_scales)

    def quantized(self, k_scale: float, v_scale: float) -> "PagedBatch":
        """The same batch over an fp8 copy of the cache (garbage slots clamp to 448: still far off the values)."""
        scales = torch.tensor([k_scale, v_scale], dtype=torch.float32, device=self.kv_cache.device)
        cache = torch.stack([quantize_fp8(self.kv_cache[0], scales[0]), quantize_fp8(self.kv_cache[1], scales[1])])
        return replace(self, kv_cache=cache, kv_scales=scales)


def make_batch(q_lens: list[int], seq_lens: list[int], *, num_heads: int, kv_heads: int, head_dim: int = 16,
               block_size: int = 4, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               seed: int = 0, extra_table_cols: int = 0) -> PagedBatch:
    """extra_table_cols > 0 makes block_tables a column slice of a wider tensor (row stride != width)."""
    assert all(0 < q <= s for q, s in zip(q_lens, seq_lens))
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # Block 0 is the table padding and belongs to no sequence; the others are handed out in shuffled order.
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(blocks_per_seq)
    tables, slots, start = [], [], 0
    for n, s in zip(blocks_per_seq, seq_lens):
        blocks = order[start:start + n]
        start += n
        tables.append(blocks + [0] * (width - n + extra_table_cols))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(s))
    cache = (torch.rand(2, num_blocks, block_size, kv_heads, head_dim, generator=g) * GARBAGE).to(dtype)
    k = torch.randn(len(slots), kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(len(slots), kv_heads, head_dim, generator=g).to(dtype)
    slot_t = torch.tensor(slots, dtype=torch.int64)
    cache.view(2, -1, kv_heads, head_dim)[0, slot_t] = k
    cache.view(2, -1, kv_heads, head_dim)[1, slot_t] = v
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    # Slots of this step's tokens (the last q_len positions), for backends that write them.
    new_slots = []
    for i, (ql, s) in enumerate(zip(q_lens, seq_lens)):
        row = tables[i]
        new_slots.extend(row[p // block_size] * block_size + p % block_size for p in range(s - ql, s))
    dev = torch.device(device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(new_slots, dtype=torch.int64, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev)[:, :width],
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        query_start=torch.tensor([0, *accumulate(q_lens)], dtype=torch.int32, device=dev),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(seq_lens), block_size=block_size)
    if extra_table_cols:
        assert meta.block_tables.stride(0) != meta.block_tables.shape[1]
    return PagedBatch(q.to(dev), cache.to(dev), meta, head_dim ** -0.5)


class LaunchCounter:
    """Wraps a jitted kernel to count its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]
