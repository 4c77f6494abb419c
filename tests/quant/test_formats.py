"""The storage formats and the quantized modules' buffers, exact against the format definitions in
engine_svc.quant (integer grids built by hand, scales that are powers of two so every product is exact)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_svc.kernels.fp8_numerics import E4M3_MAX, dequantize_fp8, quantize_fp8_rows
from engine_svc.quant.fp8_linear import Fp8Linear
from engine_svc.quant.int4_format import pack_int4, unpack_int4
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from tests.quant.e4m3_reference import e4m3_positive_values, round_to_e4m3


def linear_with(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_int8_module_recovers_a_weight_on_its_grid():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (12, 40), generator=gen, dtype=torch.int32)
    q[:, 3] = 127 * torch.where(torch.arange(12) % 2 == 0, 1, -1)      # every row reaches |q| = 127
    s = 2.0 ** -torch.randint(2, 9, (12,), generator=gen).double()
    w = (q.double() * s[:, None]).float()
    m = Int8Linear.from_linear(linear_with(w))
    assert m.qweight.dtype == torch.int8 and m.qweight.shape == (12, 40) and m.scales.shape == (12,)
    assert torch.equal(m.qweight.int(), q)
    assert torch.equal(m.scales.double(), s)
    assert torch.equal(m.dequantized_weight(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_module_recovers_a_weight_on_its_grid(dtype):
    n, k, g = 6, 64, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (n, k), generator=gen)
    q[:, ::g] = 0
    q[:, 1::g] = 15                                                   # every group spans 0..15
    s = 2.0 ** -torch.randint(1, 6, (n, k // g), generator=gen).double()
    o = torch.randint(-8, 8, (n, k // g), generator=gen).double() * s
    w = q.double() * s.repeat_interleave(g, 1) + o.repeat_interleave(g, 1)
    m = Int4Linear.from_linear(linear_with(w.to(dtype), bias=True), group_size=g)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (n, k // 2)
    assert m.scales.dtype == dtype and m.offsets.dtype == dtype and m.scales.shape == (n, k // g)
    assert torch.equal(unpack_int4(m.qweight).long(), q)
    assert torch.equal(m.scales.double(), s) and torch.equal(m.offsets.double(), o)
    assert torch.equal(m.dequantized_weight(torch.float64), w)


def test_int4_packing_puts_even_k_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0, 7, 9]])
    expected = [1 | 2 << 4, 15 | 0 << 4, 7 | 9 << 4]
    assert pack_int4(q).tolist() == [expected]
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.uint8))


def test_e4m3_reference_table_is_the_format():
    values, _ = e4m3_positive_values()
    assert values.max().item() == 448.0 and values[1].item() == 2.0 ** -9   # largest normal, smallest subnormal
    # The table agrees with torch's decoding of every finite non-negative code.
    decoded = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(decoded, values)


def test_fp8_quantization_rounds_like_the_definition():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 48, generator=gen) * torch.logspace(-3, 2, 9)[:, None]
    x[4] = 0.0                                                          # an all-zero row stays zero
    q, scale = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (9, 1)
    s_ref = x.double().abs().amax(1, keepdim=True) / E4M3_MAX
    nonzero = s_ref[:, 0] > 0
    torch.testing.assert_close(scale[nonzero].double(), s_ref[nonzero], rtol=1e-7, atol=0)
    ref = round_to_e4m3(x.double() / scale.double())
    assert torch.equal(q.double(), ref)
    assert q.double().abs().amax(1)[nonzero].eq(E4M3_MAX).all()        # each row's max maps onto 448
    assert dequantize_fp8(q, scale)[4].eq(0).all()
    w = Fp8Linear.from_linear(linear_with(x), emulate=True)          # a weight: one scale per output channel
    assert w.scales.shape == (9,) and torch.equal(w.qweight.view(torch.uint8), q.view(torch.uint8))
