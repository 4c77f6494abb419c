"""The int8 and int4 Triton matmuls (interpreted on the CPU) against the torch reference F.linear(x, dequant(W), b)
in fp32: the GEMV kernel at the GPU's tiling (M = 1, M = 3, N not a multiple of the rows per program, a ragged K
for int8), the tiled kernel (M = 5 and M = 37, not multiples of the tile) with and without split-K, with and
without bias, and group sizes 32 to 256 (G = 96 walks K in sub-groups of 32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_svc.kernels import int4_matmul as int4_module
from engine_svc.kernels import int8_matmul as int8_module
from engine_svc.kernels.int4_matmul import int4_matmul
from engine_svc.kernels.int8_matmul import int8_matmul
from engine_svc.quant.int4_format import dequantize_int4, quantize_int4
from engine_svc.quant.int8_format import dequantize_int8, quantize_int8

TOL = dict(rtol=1e-4, atol=1e-4)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # compiled kernels there, else interpreted

# (M, N, K, split_k); split_k only matters to the tiled kernel (M > 4)
INT8_CASES = [(1, 70, 1024, None), (3, 12, 600, None), (5, 70, 300, 1), (5, 70, 640, 3), (37, 130, 512, 2),
              (37, 20, 200, None)]
INT4_CASES = [(1, 70, 512, 128, None), (3, 12, 256, 32, None), (1, 9, 192, 96, None), (5, 70, 768, 256, 1),
              (5, 70, 512, 64, 4), (37, 130, 384, 128, 3), (37, 20, 256, 32, None)]


def data(m, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).to(DEV), (torch.randn(n, k, generator=gen) * 0.1).to(DEV),
            torch.randn(n, generator=gen).to(DEV))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k,split_k", INT8_CASES)
def test_int8_matmul(m, n, k, split_k, bias):
    x, w, b = data(m, n, k, seed=m * 1000 + n)
    q, s = quantize_int8(w)
    b = b if bias else None
    expected = F.linear(x, dequantize_int8(q, s), b)
    # The GEMV kernel at the CUDA tiling (its rows per program), not the interpreter's wide programs.
    out = int8_matmul(x, q, s, b, split_k=split_k, gemv_rows=int8_module.GEMV_BLOCK_N)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k,group,split_k", INT4_CASES)
def test_int4_matmul(m, n, k, group, split_k, bias):
    x, w, b = data(m, n, k, seed=m * 1000 + n + group)
    q, s, o = quantize_int4(w, group)
    b = b if bias else None
    expected = F.linear(x, dequantize_int4(q, s, o, group), b)
    out = int4_matmul(x, q, s, o, group, b, split_k=split_k, gemv_rows=int4_module.GEMV_BLOCK_N)
    torch.testing.assert_close(out, expected, **TOL)


def test_both_kernels_agree_and_leading_dims_are_kept():
    """The same rows through the GEMV kernel (one row at a time) and the tiled kernel; [..., K] inputs."""
    x, w, b = data(6, 24, 256, seed=3)
    q, s = quantize_int8(w)
    q4, s4, o4 = quantize_int4(w, 64)
    tiled8 = int8_matmul(x.view(2, 3, 256), q, s, b, gemv_max_rows=0)
    tiled4 = int4_matmul(x.view(2, 3, 256), q4, s4, o4, 64, b, gemv_max_rows=0)
    assert tiled8.shape == tiled4.shape == (2, 3, 24)
    for i in range(6):
        torch.testing.assert_close(int8_matmul(x[i:i + 1], q, s, b), tiled8.view(6, 24)[i:i + 1], **TOL)
        torch.testing.assert_close(int4_matmul(x[i:i + 1], q4, s4, o4, 64, b), tiled4.view(6, 24)[i:i + 1], **TOL)
    assert int8_matmul(x[:0], q, s).shape == (0, 24)


def test_int4_kernel_errors():
    x, w, _ = data(1, 8, 64, seed=4)
    q, s, o = quantize_int4(w, 16)
    with pytest.raises(ValueError, match="multiple of 32, got 16"):
        int4_matmul(x, q, s, o, 16)
    q, s, o = quantize_int4(w, 32)
    with pytest.raises(ValueError, match="needs scales and offsets of shape"):
        int4_matmul(x, q, s[:, :1], o, 32)
    with pytest.raises(ValueError, match="input has 63 features"):
        int8_matmul(x[:, :63], *quantize_int8(w))


@pytest.mark.parametrize("m,k,rows", [(1, 300, 16), (3, 4096, 3), (5, 64, 16)])
def test_fp8_activation_quantization_kernel_matches_the_format(m, k, rows):
    """The fused per-token quantization is bytewise quantize_fp8_rows; padding rows are zeros at the floor scale."""
    from engine_svc.kernels.fp8_act_quant import quantize_rows_fp8
    from engine_svc.kernels.fp8_numerics import SCALE_FLOOR, quantize_fp8_rows
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    x[0, :7] = torch.tensor([0.0, 1e-9, -447.9, 7.93, 2.5e-3, -0.0, 1e4])   # floor, ties, clamp
    x = x.to(DEV)
    q, s = quantize_rows_fp8(x, rows)
    q_ref, s_ref = quantize_fp8_rows(x)
    assert torch.equal(q[:m].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s[:m], s_ref)
    assert q.shape == (rows, k) and not q[m:].float().any() and (s[m:] == SCALE_FLOOR).all()


def test_gemv_takes_fp8_operands():
    """int8_gemv over e4m3 activations and weights is the W8A8 product (both scales applied after)."""
    from engine_svc.kernels.int8_matmul import int8_gemv
    from engine_svc.kernels.fp8_numerics import dequantize_fp8, quantize_fp8_rows
    gen = torch.Generator().manual_seed(9)
    xq, xs = quantize_fp8_rows(torch.randn(3, 600, generator=gen).to(DEV))
    wq, ws = quantize_fp8_rows(torch.randn(40, 600, generator=gen).to(DEV))
    ws = ws.squeeze(-1)                                   # a weight's scales: one per output channel, [N]
    bias = torch.randn(40, generator=gen).to(DEV)
    y = int8_gemv(xq, wq, ws, row_scales=xs, bias=bias, out_dtype=torch.float32)
    expected = dequantize_fp8(xq, xs) @ dequantize_fp8(wq, ws).t() + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
