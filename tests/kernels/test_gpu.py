"""On a CUDA GPU: the compiled kernels in bf16/fp16 against the torch reference within half-precision tolerance,
and the engine with the triton backend against the torch backend (greedy fp32, logits bf16)."""
from __future__ import annotations

import pytest
import torch

from engine_svc.kernels.kv_write import write_kv
from engine_svc.kernels.paged_decode_attention import paged_decode_attention
from engine_svc.kernels.paged_prefill_attention import paged_prefill_attention
from engine_svc.kernels.rmsnorm import rmsnorm
from engine_svc.kernels.rope import apply_rope
from engine_svc.kernels.swiglu import swiglu
from engine_svc.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul
from tests.kernels.paged import make_batch
from tests.kernels.test_engine_triton import PROMPTS, generate

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
HALF = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def reference_in_fp32(batch, dtype):
    """The torch reference over the same half-precision inputs, computed in fp32, rounded to dtype."""
    q, cache = batch.q, batch.kv_cache
    batch.q, batch.kv_cache = q.float(), cache.float()
    out = batch.reference().to(dtype)
    batch.q, batch.kv_cache = q, cache
    return out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (12, 4, 64), (8, 8, 80)])
def test_prefill_half(dtype, heads, kv_heads, head_dim):
    batch = make_batch([300, 1, 40, 129], [300, 700, 1000, 129], num_heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, block_size=16, dtype=dtype, device=CUDA, seed=1)
    expected = reference_in_fp32(batch, dtype)
    m = batch.meta
    out = paged_prefill_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                  m.block_size, batch.scale, max(m.query_lens_cpu))
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("partition_size", [None, 256, 512])
def test_decode_half(dtype, partition_size):
    seq_lens = [1, 300, 4096, 2000]
    batch = make_batch([1] * 4, seq_lens, num_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=dtype,
                       device=CUDA, seed=2)
    expected = reference_in_fp32(batch, dtype)
    m = batch.meta
    out = paged_decode_attention(batch.q, batch.kv_cache, m.block_tables, m.seq_lens, m.query_start,
                                 m.block_size, batch.scale, max(seq_lens), partition_size=partition_size)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_kv_write_half(dtype):
    cache = torch.zeros(2, 64, 16, 8, 128, dtype=dtype, device=CUDA)
    k, v = (torch.randn(100, 8, 128, dtype=dtype, device=CUDA) for _ in range(2))
    slots = torch.randperm(64 * 16, device=CUDA)[:100]
    write_kv(k, v, cache, slots)
    flat = cache.view(2, -1, 8, 128)
    assert torch.equal(flat[0, slots], k) and torch.equal(flat[1, slots], v)


@pytest.mark.parametrize("dtype", HALF)
def test_fused_layers_half(dtype):
    x, residual = (torch.randn(33, 4096, dtype=dtype, device=CUDA) for _ in range(2))
    layer = RMSNorm(4096, 1e-5).to(CUDA, dtype)
    with torch.no_grad():
        layer.weight.normal_()
        out, new_residual = rmsnorm(x, layer.weight, layer.eps, residual)
        ref_out, ref_residual = layer(x, residual)
    assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])

    rope = RotaryEmbedding(128, 4096, 500000.0, None)
    rope.build(CUDA)
    q, k = torch.randn(33, 32, 128, dtype=dtype, device=CUDA), torch.randn(33, 8, 128, dtype=dtype, device=CUDA)
    pos = torch.randint(0, 4096, (33,), device=CUDA)
    for a, b in zip(apply_rope(pos, q, k, rope.cos, rope.sin), rope(pos, q, k)):
        torch.testing.assert_close(a, b, **TOL[dtype])

    gate_up = torch.randn(33, 2 * 11008, dtype=dtype, device=CUDA)
    torch.testing.assert_close(swiglu(gate_up), silu_and_mul(gate_up), **TOL[dtype])


def test_engine_greedy_fp32_on_cuda(checkpoint):
    expected, _ = generate(checkpoint, "torch", "cuda")
    assert generate(checkpoint, "triton", "cuda")[0] == expected


def test_engine_graphs_and_async_scheduling_on_cuda(checkpoint):
    """Decode through captured CUDA graphs with asynchronous scheduling: the same tokens as the eager torch path."""
    expected, _ = generate(checkpoint, "torch", "cuda")
    assert generate(checkpoint, "triton", "cuda", eager=False)[0] == expected


def test_engine_logits_bf16_on_cuda(checkpoint):
    """The triton backend's bf16 prefill logits are about as close to fp32 as the torch backend's bf16 logits."""
    from engine_svc.config import EngineConfig
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine

    logits = {}
    for backend, dtype in (("torch", "float32"), ("torch", "bfloat16"), ("triton", "bfloat16")):
        engine = Engine(EngineConfig(model=str(checkpoint), device="cuda", dtype=dtype, attention_backend=backend,
                                     block_size=4, num_kv_blocks=64))
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        logits[backend, dtype] = engine.runner.forward_logits(engine.scheduler.schedule())
    exact = logits["torch", "float32"]
    torch_err = (logits["torch", "bfloat16"] - exact).abs().max().item()
    triton_err = (logits["triton", "bfloat16"] - exact).abs().max().item()
    assert triton_err <= max(2 * torch_err, 0.05), (triton_err, torch_err)
