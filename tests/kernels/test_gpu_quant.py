"""On a CUDA GPU: the compiled int8/int4 kernels and Fp8Linear (torch._scaled_mm) against their references at
Llama-like shapes in bf16, and the quantized engine (Triton kernels inside CUDA graphs) against the torch path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.kernels.int4_matmul import int4_matmul
from engine_svc.kernels.int8_matmul import int8_matmul
from engine_svc.quant.fp8_support import fp8_unsupported_reason
from engine_svc.quant.fp8_linear import Fp8Linear
from engine_svc.quant.int4_format import dequantize_int4, quantize_int4
from engine_svc.quant.int8_format import dequantize_int8, quantize_int8
from tests.kernels.test_engine_triton import PROMPTS

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SHAPES = [(4096, 1024), (1024, 14336), (6144, 4096)]     # (N, K): a slice of gate_up, down, qkv of Llama-3-8B
ROWS = [1, 3, 16, 64, 300]


def bf16_reference(x, w_dequant, bias):
    """The same bf16 inputs in fp32 against the exactly dequantized weight, rounded once to bf16."""
    return F.linear(x.float(), w_dequant, None if bias is None else bias.float()).to(torch.bfloat16)


def assert_bf16_close(out, expected):
    # One bf16 rounding of the output, plus fp32 accumulation-order differences over K terms.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.float().std().item())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_kernel_bf16(m, n, k):
    gen = torch.Generator(device=CUDA).manual_seed(m + n)
    w = torch.randn(n, k, device=CUDA, generator=gen) * 0.02
    q, s = quantize_int8(w)
    x = torch.randn(m, k, device=CUDA, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, device=CUDA, generator=gen).to(torch.bfloat16)
    assert_bf16_close(int8_matmul(x, q, s, bias), bf16_reference(x, dequantize_int8(q, s), bias))


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_kernel_bf16(m, n, k, group):
    gen = torch.Generator(device=CUDA).manual_seed(m + n + group)
    w = torch.randn(n, k, device=CUDA, generator=gen) * 0.02
    q, s, o = quantize_int4(w, group)
    s, o = s.to(torch.bfloat16), o.to(torch.bfloat16)                 # the model-dtype buffers of Int4Linear
    x = torch.randn(m, k, device=CUDA, generator=gen).to(torch.bfloat16)
    expected = bf16_reference(x, dequantize_int4(q, s, o, group), None)
    assert_bf16_close(int4_matmul(x, q, s, o, group), expected)


@pytest.mark.parametrize("m", [1, 5, 64, 300])
def test_fp8_scaled_mm_matches_the_emulation(m):
    reason = fp8_unsupported_reason(CUDA)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(m)
    lin = nn.Linear(4096, 1024, bias=True, device=CUDA, dtype=torch.bfloat16)
    fast = Fp8Linear.from_linear(lin)
    emulated = Fp8Linear.from_linear(lin, emulate=True)
    x = torch.randn(m, 4096, device=CUDA, dtype=torch.bfloat16)
    # Same e4m3 operands and scales; fp32 accumulation in both, one bf16 rounding.
    assert_bf16_close(fast(x), emulated(x))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_triton_equals_torch(checkpoint, method):
    """fp32 on the GPU: the Triton kernels, decode in CUDA graphs, give the torch path's greedy tokens."""
    def run(backend: str, eager: bool):
        engine = Engine(EngineConfig(model=str(checkpoint), device="cuda", dtype="float32", attention_backend=backend,
                                     quantization=method, block_size=4, num_kv_blocks=64, max_num_seqs=8,
                                     enforce_eager=eager))
        return engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert run("triton", eager=False) == run("torch", eager=True)
