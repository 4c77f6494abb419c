"""The batch-1 GEMV over GGUF blocks: its forms hold exactly the weights gguf's dequantize gives, the reference
GEMV is the matmul with those weights, the compiled kernel computes what the reference does, and GemvLinear
uses the kernel for one row and F.linear for more."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from engine_svc.quant.compiled_kernels import compile_kernel
from engine_svc.quant.gemv_linear import GemvLinear
from engine_svc.quant.gguf_gemv import GEMV_FUNCTIONS, GemvBlocks, q4_blocks, q8_0_blocks
from engine_svc.quant.gguf_quant import q4_to_int4

N, K = 80, 96   # three blocks a row


def _raw(qtype: T, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the block bytes of a random [N, K] weight, gguf's float32 dequantization of them)."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 0.1, size=(N, K)) * rng.uniform(0.2, 3.0, size=(N, 1))).astype(np.float32)
    raw = quantize(w, qtype)
    return raw, dequantize(raw, qtype).reshape(N, K).astype(np.float32)


def _blocks(qtype: T) -> tuple[GemvBlocks, torch.Tensor]:
    raw, weight = _raw(qtype)
    blocks = q8_0_blocks(raw) if qtype == T.Q8_0 else q4_blocks(*q4_to_int4(raw, qtype))
    return blocks, torch.from_numpy(weight)


@pytest.fixture(scope="module", params=[T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def case(request):
    return _blocks(request.param)


def _compiled(blocks: GemvBlocks):
    try:
        return compile_kernel(GEMV_FUNCTIONS[blocks.kind], (torch.zeros(blocks.in_features), *blocks.tensors))
    except Exception as err:   # noqa: BLE001  (no C++ compiler for inductor, ...)
        pytest.skip(f"inductor cannot compile here: {type(err).__name__}: {err}")


def test_blocks_hold_the_dequantized_weight_exactly(case):
    blocks, weight = case
    assert (blocks.out_features, blocks.in_features) == (N, K)
    assert torch.equal(blocks.dequantized(), weight)


def test_reference_gemv_is_the_matmul(case):
    blocks, weight = case
    x = torch.randn(K, generator=torch.Generator().manual_seed(1))
    expected = weight.double() @ x.double()
    torch.testing.assert_close(blocks.reference(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_compiled_gemv_computes_the_reference(case):
    blocks, _ = case
    kernel = _compiled(blocks)
    for seed in range(3):
        x = torch.randn(K, generator=torch.Generator().manual_seed(seed)) * 4
        torch.testing.assert_close(kernel(x, *blocks.tensors), blocks.reference(x), rtol=1e-5, atol=1e-5)


def test_compiled_kernels_are_shared_by_shape():
    blocks, _ = _blocks(T.Q4_1)
    other, _ = _blocks(T.Q4_0)
    assert _compiled(blocks) is _compiled(other)


def test_one_tensor_passed_twice_is_refused():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="distinct"):
        compile_kernel(torch.add, (x, x))


def test_gemv_linear_one_row_on_the_kernel_rows_on_f_linear(case):
    blocks, weight = case
    bias = torch.randn(N)
    layer = GemvLinear(weight.clone(), bias, blocks)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    assert torch.equal(layer(x), F.linear(x, weight, bias))          # not compiled: F.linear for any rows
    _compiled(blocks)
    layer.compile()
    calls = []
    kernel = layer.kernel
    layer.kernel = lambda *args: calls.append(len(args)) or kernel(*args)
    torch.testing.assert_close(layer(x[:1]), F.linear(x[:1], weight, bias), rtol=1e-5, atol=1e-5)
    assert calls == [1 + len(blocks.tensors)]
    assert torch.equal(layer(x), F.linear(x, weight, bias)) and len(calls) == 1


def test_gemv_linear_refuses_blocks_of_another_shape():
    blocks, weight = _blocks(T.Q4_1)
    with pytest.raises(ValueError, match="GEMV blocks of 80 x 96"):
        GemvLinear(weight[:, :64].contiguous(), None, blocks)
