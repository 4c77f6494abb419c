"""The int4 GEMV over the pre-shuffled layout against int4_matmul's GEMV over the plain one, within the stated
bound (fp32 summation order; bitwise under the interpreter, where the order is the same), and against the torch
reference: ragged N (the last row block partly padding), K not a multiple of a program's iteration (padded
sub-groups), group sizes 32 to 256 (a scale repeated over the sub-groups of a group), forced K splits, bias, bf16.
Then Int4Linear's dispatch and the load-time choice (engine_svc.quant.int4_gemv_layout)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.kernels import int4_gemv_shuffled as shuffled_module
from engine_svc.kernels import int4_matmul as int4_module
from engine_svc.kernels.int4_gemv_shuffled import int4_gemv_shuffled, shuffle_int4_for_gemv
from engine_svc.kernels.int4_matmul import int4_matmul, sub_group
from engine_svc.quant.int4_format import dequantize_int4, quantize_int4, unpack_int4
from engine_svc.quant.int4_gemv_layout import apply_int4_gemv_layout
from engine_svc.quant.int4_linear import Int4Linear

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # compiled kernels there, else interpreted
U = 2.0 ** -24   # fp32 unit roundoff

# (M, N, K, group, split_k, block_n): block_n small enough for several row blocks at these N
CASES = [(1, 70, 512, 128, None, 16), (3, 12, 384, 128, None, 8), (1, 9, 192, 96, None, 8),
         (2, 40, 768, 256, 2, 16), (1, 33, 320, 64, 3, 32), (4, 20, 256, 32, None, 64)]


def weight(n, k, group, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, s, o = quantize_int4(torch.randn(n, k, generator=gen) * 0.1, group)
    return q.to(DEV), s.to(dtype).to(DEV), o.to(dtype).to(DEV)


def summation_bound(x, q, s, o, group):
    """2 gamma(K) sum_k |x_k| (|q_k s_k| + |o_k|) per output: how far two fp32 summation orders of the same terms
    can drift apart (computed in float64)."""
    k = x.shape[-1]
    qf = unpack_int4(q).double()
    sf = s.double().repeat_interleave(group, dim=1)
    of = o.double().repeat_interleave(group, dim=1)
    gamma = k * U / (1 - k * U)
    return 2 * gamma * (x.double().abs() @ ((qf * sf).abs() + of.abs()).T)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k,group,split_k,block_n", CASES)
def test_matches_the_plain_gemv_within_the_bound(m, n, k, group, split_k, block_n, bias):
    gen = torch.Generator().manual_seed(m * 100 + n)
    q, s, o = weight(n, k, group, seed=n + group, dtype=torch.float32)
    x = torch.randn(m, k, generator=gen).to(DEV)
    b = torch.randn(n, generator=gen).to(DEV) if bias else None
    shuffled = shuffle_int4_for_gemv(q, s, o, group, block_n=block_n)
    assert shuffled.codes.is_contiguous() and shuffled.codes.shape[2] == block_n * 2 * sub_group(group)
    out = int4_gemv_shuffled(x, shuffled, b, split_k=split_k)
    plain = int4_matmul(x, q, s, o, group, b, split_k=split_k, gemv_rows=int4_module.GEMV_BLOCK_N)
    assert ((out - plain).abs().double() <= summation_bound(x, q, s, o, group)).all()
    if DEV.type == "cpu":   # the interpreter adds in the same order: the same bits
        assert torch.equal(out, plain)
    torch.testing.assert_close(out, F.linear(x, dequantize_int4(q, s, o, group), b), rtol=1e-4, atol=1e-4)


def test_bf16_agrees_to_one_rounding_and_leading_dims_are_kept():
    q, s, o = weight(50, 384, 128, seed=5, dtype=torch.bfloat16)
    x = torch.randn(2, 1, 384, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).to(DEV)
    out = int4_gemv_shuffled(x, shuffle_int4_for_gemv(q, s, o, 128, block_n=16))
    plain = int4_matmul(x, q, s, o, 128)
    assert out.shape == (2, 1, 50) and out.dtype == torch.bfloat16
    # Both round one fp32 sum (within the bound of each other) to bf16: at most one bf16 step apart.
    step = torch.finfo(torch.bfloat16).eps * plain.float().abs().clamp(min=2.0 ** -126)
    bound = summation_bound(x.view(2, 384).float(), q, s, o, 128).view(2, 1, 50)
    assert ((out.float() - plain.float()).abs().double() <= bound + step.double()).all()


def test_shuffle_refuses_mismatched_scales():
    q, s, o = weight(8, 256, 64, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="scales and offsets"):
        shuffle_int4_for_gemv(q, s[:, :2], o[:, :2], 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        shuffle_int4_for_gemv(q, s, o, 16)


def test_int4_linear_takes_the_shuffled_gemv_for_few_rows_only(monkeypatch):
    dense = nn.Linear(256, 40, bias=True).to(DEV)
    plain = Int4Linear.from_linear(dense, 64, use_triton=True)
    layer = Int4Linear.from_linear(dense, 64, use_triton=True)
    layer.use_shuffled_gemv()
    assert "gemv_codes" not in layer.state_dict() and "gemv_layout=shuffled" in repr(layer)
    calls = []
    kernel = shuffled_module._int4_gemv_shuffled_kernel

    class Counting:   # the launch syntax kernel[grid](...), counted
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]
    monkeypatch.setattr(shuffled_module, "_int4_gemv_shuffled_kernel", Counting())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for rows in (1, 4, 5):
            x = torch.randn(rows, 256, generator=gen).to(DEV)
            torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2   # M = 1 and M = 4 (<= GEMV_MAX_ROWS); M = 5 took the plain tiled kernel


def test_the_layout_applies_to_the_triton_int4_linears_only():
    model = nn.Sequential(Int4Linear.from_linear(nn.Linear(128, 16), 64, use_triton=True),
                          Int4Linear.from_linear(nn.Linear(128, 16), 64, use_triton=False))
    assert apply_int4_gemv_layout(model, "plain") == 0 and model[0].gemv_codes is None
    assert apply_int4_gemv_layout(model, "shuffled") == 1   # the torch-path layer keeps the plain buffers only
    assert model[0].gemv_codes is not None and model[1].gemv_codes is None
    with pytest.raises(ValueError, match="plain, shuffled"):
        apply_int4_gemv_layout(model, "marlin")


def test_an_engine_loaded_with_the_shuffled_layout_generates_the_same_tokens(checkpoint):
    """Through the engine: --int4-gemv-layout shuffled gives every int4 linear the shuffled copy, and greedy
    decoding (the GEMV at batch 1 and 2) gives the plain layout's tokens."""
    from engine_svc.config import EngineConfig
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine

    def run(layout: str):
        engine = Engine(EngineConfig(model=str(checkpoint), device=DEV.type, dtype="float32",
                                     attention_backend="triton", quantization="int4", block_size=4, num_kv_blocks=32,
                                     max_num_seqs=2, enforce_eager=True, int4_gemv_layout=layout))
        layers = [m for m in engine.runner.model.modules() if isinstance(m, Int4Linear)]
        outs = engine.generate([[5, 17, 99, 3], [1, 2]], SamplingParams(temperature=0.0, max_tokens=4,
                                                                         ignore_eos=True))
        return outs, layers

    plain, plain_layers = run("plain")
    shuffled, layers = run("shuffled")
    assert layers and all(m.gemv_codes is not None for m in layers)
    assert all(m.gemv_codes is None for m in plain_layers)
    assert shuffled == plain and all(len(o) == 4 for o in plain)
