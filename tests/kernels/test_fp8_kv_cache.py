"""The Triton kernels over an fp8 (e4m3) KV cache: the quantizing write byte for byte against the torch backend's,
the decode and prefill kernels against the torch reference over the same fp8 cache (tight: both dequantize the
same bytes with the same scales, only the order of fp32 operations differs), and against attention over the
unquantized values (loose: that difference is e4m3's own rounding). GQA groups, splits and sliding windows as in
the unquantized kernel tests; non-unit scales so that a scale applied twice or not at all shows."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import TorchPagedAttention
from engine_svc.attention.triton_backend import TritonPagedAttention
from engine_svc.kernels.fp8_numerics import E4M3
from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.paged import make_batch
from tests.kernels.test_engine_triton import generate
from tests.kernels.test_kv_write import meta_for

SCALES = (0.5, 1.7)          # K, V
GQA = [(2, 2), (6, 2), (4, 1)]
TIGHT = dict(rtol=1e-5, atol=1e-5)
# e4m3 keeps 3 mantissa bits: each stored element is off by up to 2^-4 of its magnitude, i.e. up to ~0.25 for the
# N(0, 1) keys/values of these batches (|x| < ~4). The output, a softmax-weighted mean of values under slightly
# moved weights, is off by about as much at worst and by far less on average (observed: max ~0.11, mean ~0.009).
# A scale missing or applied twice moves the outputs by a multiple of their own size (mean |o| ~0.25).
LOOSE_MAX, LOOSE_MEAN = 0.25, 0.03


def decode(batch, window=None, **kw):
    m = batch.meta
    return paged_decode_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max(m.seq_lens_cpu), window=window,
                                  kv_scales=batch.kv_scales, **kw)


def prefill(batch, window=None, **kw):
    m = batch.meta
    return paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                   m.block_size, batch.scale, max(m.query_lens_cpu), window=window,
                                   kv_scales=batch.kv_scales, **kw)


def assert_near_unquantized(out, unquantized):
    err = (out - unquantized).abs()
    assert err.max().item() <= LOOSE_MAX and err.mean().item() <= LOOSE_MEAN, (err.max().item(), err.mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_stores_the_torch_backends_bytes(device, dtype):
    g = torch.Generator().manual_seed(3)
    num_blocks, block_size, kv_heads, head_dim, tokens = 9, 4, 2, 16, 23
    # Views of one fused projection, magnitudes from subnormal to past the clamp (448 * scale).
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=g)
    qkv *= torch.tensor([1e-3, 1.0, 30.0, 2000.0]).repeat_interleave(tokens // 4 + 1)[:tokens, None]
    qkv = qkv.to(dtype).to(device)
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(device)
    scales = torch.tensor([0.37, 3.0], device=device)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(E4M3).to(device)
    expected = cache.clone()
    TorchPagedAttention().write_kv(k, v, expected, meta_for(slots, block_size), kv_scales=scales)
    write_kv(k, v, cache, slots, kv_scales=scales)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert expected.float().abs().max().item() == 448.0   # the clamp was exercised


def test_write_rounds_to_nearest_even_with_saturation(device):
    """Hand-checked e4m3 roundings: a carry into the exponent, ties to the even mantissa, subnormals, the clamp.
    (The Triton interpreter's own conversion gets the first three wrong; see engine_svc/kernels/_interpreter_fp8.py.)"""
    # 7.93: 7.5 + carry -> 8; 1.0625 and 1.1875: ties between 1, 1.125, 1.25 -> the even mantissa; 4.5 and 0.5
    # subnormal steps (2^-9): ties -> 4 steps and 0; 465 and beyond: clamped to 448.
    x = torch.tensor([7.93, 1.0625, 1.1875, 4.5 * 2.0 ** -9, 2.0 ** -10, 447.0, 465.0, 1e9, -1e9, -3.3], device=device)
    want = torch.tensor([8.0, 1.0, 1.25, 4 * 2.0 ** -9, 0.0, 448.0, 448.0, 448.0, -448.0, -3.25])
    k = x.view(-1, 1, 1).expand(-1, 1, 16).contiguous()
    cache = torch.zeros(2, 3, 4, 1, 16, dtype=E4M3, device=device)
    write_kv(k, k, cache, torch.arange(len(x), device=device), kv_scales=torch.ones(2, device=device))
    stored = cache.view(2, -1, 16)[:, :len(x)].float().cpu()
    assert torch.equal(stored[0, :, 0], want) and torch.equal(stored[1], stored[0])
    assert stored.eq(stored[..., :1]).all()


def test_write_skips_negative_slots(device):
    cache = torch.zeros(2, 3, 4, 1, 16, dtype=E4M3, device=device)
    k = torch.ones(3, 1, 16, device=device)
    write_kv(k, 2 * k, cache, torch.tensor([5, -1, 0], device=device), kv_scales=torch.tensor([0.5, 0.5], device=device))
    flat = cache.view(2, -1, 16).float()
    assert flat[0, [0, 5]].eq(2).all() and flat[1, [0, 5]].eq(4).all()
    assert flat[:, [i for i in range(12) if i not in (0, 5)]].eq(0).all()


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("partition_size", [16, 128], ids=["split", "single"])
def test_decode(device, heads, kv_heads, partition_size):
    batch = make_batch([1] * 5, [1, 7, 33, 70, 16], num_heads=heads, kv_heads=kv_heads, device=device,
                       seed=heads + partition_size)
    fp8 = batch.quantized(*SCALES)
    out = decode(fp8, partition_size=partition_size, block_n=16)
    torch.testing.assert_close(out, fp8.reference(), **TIGHT)
    assert_near_unquantized(out, batch.reference())


@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_prefill(device, heads, kv_heads):
    # A prompt, a decode row, a chunk over a cached prefix, and a chunk longer than one 32-row tile.
    batch = make_batch([4, 1, 6, 40], [4, 21, 30, 50], num_heads=heads, kv_heads=kv_heads, device=device,
                       seed=heads)
    fp8 = batch.quantized(*SCALES)
    out = prefill(fp8, block_m=32, block_n=16)
    torch.testing.assert_close(out, fp8.reference(), **TIGHT)
    assert_near_unquantized(out, batch.reference())


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 1)])
@pytest.mark.parametrize("window", [5, 20])
def test_sliding_window(device, heads, kv_heads, window):
    batch = make_batch([1] * 4, [3, 45, 70, 17], num_heads=heads, kv_heads=kv_heads, device=device, seed=window)
    fp8 = batch.quantized(*SCALES)
    torch.testing.assert_close(decode(fp8, window, partition_size=16, block_n=16), fp8.reference(window), **TIGHT)
    chunks = make_batch([4, 1, 9, 30], [4, 21, 30, 64], num_heads=heads, kv_heads=kv_heads, device=device,
                        seed=window + 1).quantized(*SCALES)
    out = prefill(chunks, window, block_m=32, block_n=16)
    torch.testing.assert_close(out, chunks.reference(window), **TIGHT)
    assert not torch.allclose(out, chunks.reference(), atol=1e-3)   # the window changed something


@pytest.mark.parametrize("q_lens,seq_lens", [([4, 1, 6, 1], [4, 21, 30, 9]), ([1, 1, 1], [3, 37, 20])],
                         ids=["mixed", "decode"])
def test_backend_writes_then_attends_like_torch(device, q_lens, seq_lens):
    batch = make_batch(q_lens, seq_lens, num_heads=6, kv_heads=2, device=device, seed=11).quantized(*SCALES)
    g = torch.Generator().manual_seed(12)
    k, v = (torch.randn(len(batch.meta.slot_mapping), 2, 16, generator=g).to(device) for _ in range(2))
    results = []
    for backend in (TorchPagedAttention(), TritonPagedAttention(decode_partition_size=16)):
        cache = batch.kv_cache.clone()
        backend.write_kv(k, v, cache, batch.meta, kv_scales=batch.kv_scales)
        results.append((cache, backend.forward(batch.q, cache, batch.meta, batch.scale, kv_scales=batch.kv_scales)))
    (ref_cache, ref_out), (cache, out) = results
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    torch.testing.assert_close(out, ref_out, **TIGHT)


def test_scales_must_match_the_cache(device):
    batch = make_batch([1, 1], [5, 9], num_heads=2, kv_heads=2, device=device)
    fp8 = batch.quantized(*SCALES)
    with pytest.raises(ValueError, match="needs kv_scales"):
        decode(fp8.__class__(fp8.q, fp8.kv_cache, fp8.meta, fp8.scale))
    with pytest.raises(ValueError, match="only an fp8 cache"):
        prefill(batch.__class__(batch.q, batch.kv_cache, batch.meta, batch.scale, fp8.kv_scales))
    with pytest.raises(ValueError, match="float32 \\[2\\]"):
        write_kv(batch.q[:, :2], batch.q[:, :2], fp8.kv_cache, batch.meta.slot_mapping, kv_scales=fp8.kv_scales[:1])


def test_engine_greedy_triton_equals_torch_over_fp8(checkpoint):
    """The whole engine with an fp8 cache (chunked prefill, a prefix hit, split-KV decode): the Triton kernels give
    the torch backend's greedy tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected, _ = generate(checkpoint, "torch", device, kv_cache_dtype="fp8")
    assert generate(checkpoint, "triton", device, kv_cache_dtype="fp8")[0] == expected
