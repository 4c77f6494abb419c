"""On a CUDA GPU: the compiled kernels over an fp8 (e4m3) KV cache. The write must store the torch backend's
bytes (both divide correctly rounded, clamp, and round to nearest even); decode and prefill in bf16/fp16 against
the torch reference over the same fp8 cache computed in fp32 (half-precision tolerance, as the unquantized
half-precision tests); the engine with the triton backend and an fp8 cache against the torch backend's, eager and
through CUDA graphs."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import TorchPagedAttention
from engine_svc.kernels.fp8_numerics import E4M3
from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.paged import make_batch
from tests.kernels.test_engine_triton import generate
from tests.kernels.test_kv_write import meta_for

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
HALF = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}
SCALES = (0.5, 1.7)


def reference_in_fp32(batch, dtype, window=None):
    """The torch reference over the same fp8 cache with fp32 queries, rounded to dtype."""
    m = batch.meta
    return TorchPagedAttention().forward(batch.q.float(), batch.kv_cache, m, batch.scale, window=window,
                                         kv_scales=batch.kv_scales).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_kv_write_fp8_bytes(dtype):
    k, v = (torch.randn(500, 8, 128, device=CUDA) * 40 for _ in range(2))   # some past the clamp
    k, v = k.to(dtype), v.to(dtype)
    slots = torch.randperm(64 * 16, device=CUDA)[:500]
    scales = torch.tensor([0.37, 3.0], device=CUDA)
    cache = torch.zeros(2, 64, 16, 8, 128, dtype=E4M3, device=CUDA)
    expected = cache.clone()
    write_kv(k, v, cache, slots, kv_scales=scales)
    TorchPagedAttention().write_kv(k, v, expected, meta_for(slots, 16), kv_scales=scales)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (12, 4, 64)])
def test_prefill_fp8(dtype, heads, kv_heads, head_dim):
    batch = make_batch([300, 1, 40, 129], [300, 700, 1000, 129], num_heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, block_size=16, dtype=dtype, device=CUDA, seed=1).quantized(*SCALES)
    m = batch.meta
    for window in (None, 100):
        out = paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                      m.block_size, batch.scale, max(m.query_lens_cpu), window=window,
                                      kv_scales=batch.kv_scales)
        torch.testing.assert_close(out, reference_in_fp32(batch, dtype, window), **TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("partition_size", [None, 256])
def test_decode_fp8(dtype, partition_size):
    seq_lens = [1, 300, 4096, 2000]
    batch = make_batch([1] * 4, seq_lens, num_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=dtype,
                       device=CUDA, seed=2).quantized(*SCALES)
    m = batch.meta
    for window in (None, 1000):
        out = paged_decode_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                     m.block_size, batch.scale, max(seq_lens), partition_size=partition_size,
                                     window=window, kv_scales=batch.kv_scales)
        torch.testing.assert_close(out, reference_in_fp32(batch, dtype, window), **TOL[dtype])


def test_engine_greedy_fp8_triton_equals_torch_on_cuda(checkpoint):
    expected, _ = generate(checkpoint, "torch", "cuda", kv_cache_dtype="fp8")
    assert generate(checkpoint, "triton", "cuda", kv_cache_dtype="fp8")[0] == expected
    # Decode through captured CUDA graphs (the scales are read from their tensor) with asynchronous scheduling.
    assert generate(checkpoint, "triton", "cuda", eager=False, kv_cache_dtype="fp8")[0] == expected
