"""The fused RoPE + KV write kernel against the two kernels it replaces run in sequence (apply_rope, then
write_kv): bit for bit, for every activation dtype, a cache in the model dtype and an fp8 cache with its scales,
at ragged shapes (head counts and half head_dim that are not powers of two, padding slots); and through the Triton
backend against the torch backend's RoPE + write."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import KVCache, TorchPagedAttention
from engine_svc.attention.triton_backend import TritonPagedAttention
from engine_svc.kernels.fp8_numerics import E4M3
from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.rope import apply_rope
from engine_svc.kernels.rope_kv_write import rope_write_kv
from engine_svc.models.layers import RotaryEmbedding
from tests.kernels.test_kv_write import meta_for

HEADS, KV_HEADS, HEAD_DIM, TOKENS, BLOCK_SIZE, NUM_BLOCKS = 6, 3, 24, 11, 4, 7
MAX_POS = 64
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def step(dtype, device, seed=0, magnitudes=(1.0,)):
    """(positions, q, k, v as views of one fused qkv, slots with two padding tokens): the layer's inputs."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(TOKENS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    qkv *= torch.tensor(magnitudes).repeat(TOKENS)[:TOKENS, None]
    qkv = qkv.to(dtype).to(device)
    q = qkv[:, :HEADS * HEAD_DIM].view(TOKENS, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(TOKENS, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(TOKENS, KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_POS, (TOKENS,), generator=g).to(device)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:TOKENS]
    slots[[2, 7]] = -1
    return positions, q, k, v, slots.to(device)


def rope_tables(device, scaling=None):
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, 500000.0, scaling, fused=True)
    rope.build(device)
    return rope


def empty_cache(cache_dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(cache_dtype).to(device)


def bits(t):
    return t.view(torch.uint8) if t.dtype == E4M3 else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [False, True], ids=["model-dtype-cache", "fp8-cache"])
def test_equals_rope_then_kv_write_bitwise(device, dtype, fp8):
    # fp8: magnitudes from subnormal to past the clamp (448 * scale), non-unit scales.
    positions, q, k, v, slots = step(dtype, device, magnitudes=(1e-3, 1.0, 30.0, 2000.0) if fp8 else (1.0,))
    rope = rope_tables(device, LLAMA3)
    scales = torch.tensor([0.37, 3.0], device=device) if fp8 else None
    cache = empty_cache(E4M3 if fp8 else dtype, device)
    expected_cache = cache.clone()
    k_before = k.clone()
    ref_q, ref_k = apply_rope(positions, q, k, rope.cos, rope.sin)
    write_kv(ref_k, v, expected_cache, slots, kv_scales=scales)

    out_q = rope_write_kv(positions, q, k, v, rope.cos, rope.sin, cache, slots, kv_scales=scales)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(q, ref_q)
    assert torch.equal(bits(cache), bits(expected_cache))
    assert torch.equal(k, k_before)   # k is read, never written
    if fp8:
        assert expected_cache.float().abs().max().item() == 448.0   # the clamp was exercised


def test_padding_tokens_write_nothing_but_rotate_q(device):
    positions, q, k, v, _ = step(torch.float32, device, seed=2)
    rope = rope_tables(device)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device)
    ref_q, _ = apply_rope(positions, q, k, rope.cos, rope.sin)
    rope_write_kv(positions, q, k, v, rope.cos, rope.sin, cache, torch.full((TOKENS,), -1, device=device))
    assert torch.equal(q, ref_q) and not cache.any()


def test_mismatched_shapes_and_scales_are_refused(device):
    positions, q, k, v, slots = step(torch.float32, device)
    rope = rope_tables(device)
    with pytest.raises(ValueError, match="disagree"):
        rope_write_kv(positions, q, k, v[:, :2], rope.cos, rope.sin, empty_cache(torch.float32, device), slots)
    with pytest.raises(ValueError, match="needs kv_scales"):
        rope_write_kv(positions, q, k, v, rope.cos, rope.sin, empty_cache(E4M3, device), slots)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32-cache", "fp8-cache"])
def test_triton_backend_fuses_and_matches_the_torch_backend(device, fp8):
    """rope_and_write_kv: the Triton backend's fused launch equals its unfused pair bitwise, and the torch backend's
    torch RoPE + write up to fp32 rounding (fp8: the same codes but where a rounding moves one across a boundary)."""
    positions, q, k, v, slots = step(torch.float32, device, seed=3)
    slots = torch.where(slots < 0, slots.max() + 1, slots)    # the torch write takes no padding slots
    meta = meta_for(slots, BLOCK_SIZE)
    rope = rope_tables(device, LLAMA3)
    scales = torch.tensor([0.5, 1.7], device=device) if fp8 else None
    runs = {}
    for name, backend in (("fused", TritonPagedAttention()), ("pair", TritonPagedAttention(fuse_rope_kv_write=False)),
                          ("torch", TorchPagedAttention())):
        cache = KVCache(empty_cache(E4M3 if fp8 else torch.float32, device), scales)
        out_q = backend.rope_and_write_kv(rope, positions, q.clone(), k.clone(), v.clone(), cache, meta)
        runs[name] = out_q, cache.data.float()
    assert torch.equal(runs["fused"][0], runs["pair"][0]) and torch.equal(runs["fused"][1], runs["pair"][1])
    torch.testing.assert_close(runs["fused"][0], runs["torch"][0], rtol=1e-5, atol=1e-5)
    if fp8:   # e4m3 codes: equal but where the fp32 rope's last bit crossed a rounding boundary (one e4m3 step)
        differ = runs["fused"][1] != runs["torch"][1]
        assert differ.float().mean().item() < 0.02
        torch.testing.assert_close(runs["fused"][1], runs["torch"][1], rtol=0.07, atol=0.01)
    else:
        torch.testing.assert_close(runs["fused"][1], runs["torch"][1], rtol=1e-5, atol=1e-5)
