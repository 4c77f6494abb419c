"""fp16 inputs through every kernel (fp32 accumulation inside) against the torch reference computed in fp32.
bf16 is only checked on a GPU (test_gpu.py): the Triton interpreter multiplies bf16 tl.dot operands as raw
16-bit integers and truncates fp32 -> bf16 conversions, so it cannot stand in for the hardware there."""
from __future__ import annotations

import torch

from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from engine_svc.kernels.rmsnorm import rmsnorm
from engine_svc.kernels.rope import apply_rope
from engine_svc.kernels.swiglu import swiglu
from engine_svc.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul
from tests.kernels.paged import make_batch

TOL = dict(rtol=5e-3, atol=5e-3)


def fp32_reference(batch):
    q, cache = batch.q, batch.kv_cache
    batch.q, batch.kv_cache = q.float(), cache.float()
    out = batch.reference().half()
    batch.q, batch.kv_cache = q, cache
    return out


def test_attention_fp16(device):
    mixed = make_batch([6, 1, 3], [6, 30, 20], num_heads=6, kv_heads=2, block_size=4, dtype=torch.float16,
                       device=device, seed=21)
    m = mixed.meta
    out = paged_prefill_attention(mixed.q, mixed.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, mixed.scale, 6, block_m=16, block_n=16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, fp32_reference(mixed), **TOL)

    decode = make_batch([1, 1], [50, 9], num_heads=4, kv_heads=1, block_size=16, dtype=torch.float16,
                        device=device, seed=22)
    m = decode.meta
    out = paged_decode_attention(decode.q, decode.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                 m.block_size, decode.scale, 50, partition_size=16, block_n=16)
    torch.testing.assert_close(out, fp32_reference(decode), **TOL)


def test_fused_layers_fp16(device):
    g = torch.Generator().manual_seed(23)
    x, residual = (torch.randn(5, 64, generator=g).half().to(device) for _ in range(2))
    layer = RMSNorm(64, 1e-5).half().to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, generator=g))
        out, new_residual = rmsnorm(x, layer.weight, layer.eps, residual)
        ref_out, ref_residual = layer(x, residual)
    assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(out, ref_out, **TOL)

    rope = RotaryEmbedding(16, 64, 10000.0, None)
    rope.build(device)
    q, k = torch.randn(5, 4, 16, generator=g).half().to(device), torch.randn(5, 2, 16, generator=g).half().to(device)
    pos = torch.tensor([0, 1, 17, 40, 63], device=device)
    for a, b in zip(apply_rope(pos, q, k, rope.cos, rope.sin), rope(pos, q, k)):
        torch.testing.assert_close(a, b, **TOL)

    gate_up = (torch.randn(5, 96, generator=g) * 3).half().to(device)
    torch.testing.assert_close(swiglu(gate_up), silu_and_mul(gate_up), **TOL)
