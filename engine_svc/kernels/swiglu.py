"""SwiGLU activation on the fused gate_up projection: out = silu(gate) * up with gate_up = [gate | up] on the last
dimension ([..., 2 * I] -> [..., I]).

Grid: (num_rows, cdiv(I, BLOCK)). silu is computed in fp32 and rounded to the activation dtype before the multiply,
as F.silu(gate) * up does in layers.silu_and_mul.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < inter
    gate = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + c, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    shape = gate_up.shape
    inter = shape[-1] // 2
    x = gate_up.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] > 0:
        block = min(BLOCK, triton.next_power_of_2(inter))
        _swiglu_kernel[(x.shape[0], triton.cdiv(inter, block))](x, out, inter, x.stride(0), out.stride(0), BLOCK=block)
    return out.view(*shape[:-1], inter)


__all__ = ["swiglu"]
