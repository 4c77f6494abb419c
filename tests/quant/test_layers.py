"""The quantized modules' forward passes against references computed in the test: the torch paths against
F.linear over weights dequantized by the format formulas, Fp8Linear's emulation against the independent e4m3
reference, and the errors for what a module cannot do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.quant.fp8_linear import Fp8Linear
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from tests.quant.e4m3_reference import fp8_linear_reference


def random_linear(k: int, n: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.2)
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_int8_torch_path(bias):
    lin = random_linear(48, 24, bias, 0)
    m = Int8Linear.from_linear(lin)
    w = m.qweight.double() * m.scales.double()[:, None]                  # w = q * s[n]
    x = torch.randn(2, 5, 48)
    expected = F.linear(x.double(), w, None if lin.bias is None else lin.bias.double())
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    # Quantization error stays within half a step per weight.
    assert ((w - lin.weight.double()).abs() <= m.scales.double()[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int4_torch_path(bias):
    lin = random_linear(64, 20, bias, 1)
    g = 32
    m = Int4Linear.from_linear(lin, group_size=g)
    b = m.qweight.long()
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(20, 64)            # k = 2j low nibble, 2j + 1 high
    w = q.double() * m.scales.double().repeat_interleave(g, 1) + m.offsets.double().repeat_interleave(g, 1)
    x = torch.randn(7, 64)
    expected = F.linear(x.double(), w, None if lin.bias is None else lin.bias.double())
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert ((w - lin.weight.double()).abs() <= m.scales.double().repeat_interleave(g, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_emulation_matches_an_independent_reference(bias):
    lin = random_linear(64, 32, bias, 2)
    m = Fp8Linear.from_linear(lin, emulate=True)
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 1, 5)[None, :, None]
    expected = fp8_linear_reference(x.reshape(-1, 64), lin.weight, lin.bias).view(3, 5, 32)
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_fp8_without_a_capable_gpu_is_refused():
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*the device is cpu"):
        Fp8Linear.from_linear(random_linear(64, 32, False, 3))


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=48), "even group size dividing"),            # 64 % 48
    (dict(group_size=7), "even group size"),
    (dict(group_size=16, use_triton=True), "multiple of 32"),
])
def test_int4_group_size_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        Int4Linear(64, 8, **kw)


def test_fp8_shape_rule():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(40, 32)
