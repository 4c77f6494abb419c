"""The fused RMSNorm(+residual), RoPE and SwiGLU kernels against the torch layers they replace, directly and
through the layers' fused=True dispatch."""
from __future__ import annotations

import pytest
import torch

from engine_svc.kernels.rmsnorm import rmsnorm
from engine_svc.kernels.rope import apply_rope
from engine_svc.kernels.swiglu import swiglu
from engine_svc.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def randn(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def norm_layer(hidden, device, fused=False):
    layer = RMSNorm(hidden, 1e-5, fused=fused).to(device)
    with torch.no_grad():
        layer.weight.copy_(randn(hidden, seed=9, device=device))
    return layer


@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 40)])
def test_rmsnorm(device, shape):
    layer = norm_layer(shape[-1], device)
    x = randn(*shape, seed=1, device=device)
    with torch.no_grad():
        torch.testing.assert_close(rmsnorm(x, layer.weight, layer.eps), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 40)])
def test_rmsnorm_with_residual(device, shape):
    layer = norm_layer(shape[-1], device)
    x, residual = randn(*shape, seed=1, device=device), randn(*shape, seed=2, device=device)
    x0, r0 = x.clone(), residual.clone()
    with torch.no_grad():
        out, new_residual = rmsnorm(x, layer.weight, layer.eps, residual)
        ref_out, ref_residual = layer(x, residual)
    assert torch.equal(new_residual, x0 + r0) and torch.equal(ref_residual, x0 + r0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(residual, r0)   # inputs untouched


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_on_views_of_fused_qkv(device, scaling, inplace):
    heads, kv_heads, head_dim, tokens = 6, 2, 16, 9
    rope = RotaryEmbedding(head_dim, 64, 10000.0, scaling)
    rope.build(device)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=3, device=device)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 3, 31, 32, 33, 63, 5], device=device)
    ref_q, ref_k = rope(positions, q, k)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    out_q, out_k = apply_rope(positions, q, k, rope.cos, rope.sin, inplace=inplace)
    torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-5, atol=1e-5)
    assert (out_q.data_ptr() == q.data_ptr()) == inplace
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)   # v shares the buffer, never written


@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 80), (3, 2 * 1100)])   # 1100 > one 1024-wide block
def test_swiglu(device, shape):
    gate_up = randn(*shape, seed=4, device=device) * 4
    torch.testing.assert_close(swiglu(gate_up), silu_and_mul(gate_up), rtol=1e-5, atol=1e-5)


def test_layers_dispatch_to_kernels_when_fused(device):
    x, residual = randn(5, 64, seed=5, device=device), randn(5, 64, seed=6, device=device)
    plain, fused = norm_layer(64, device), norm_layer(64, device, fused=True)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
        for a, b in zip(fused(x, residual), plain(x, residual)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rope, rope_fused = (RotaryEmbedding(16, 32, 500000.0, LLAMA3, fused=f) for f in (False, True))
    rope.build(device)
    rope_fused.build(device)
    q, k, pos = randn(5, 4, 16, seed=7, device=device), randn(5, 2, 16, seed=8, device=device), torch.arange(5)
    expected = rope(pos.to(device), q, k)
    for a, b in zip(rope_fused(pos.to(device), q.clone(), k.clone()), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gate_up = randn(5, 2 * 48, seed=9, device=device)
    torch.testing.assert_close(silu_and_mul(gate_up, fused=True), silu_and_mul(gate_up), rtol=1e-5, atol=1e-5)
