"""RMSNorm, optionally fused with the residual add before it (residual = x + residual; out = rmsnorm(residual)).

Grid: (num_rows,); one program normalises one row of `hidden` elements held in a single block. The casts mirror
layers.RMSNorm (and the model-dtype residual add of the unfused decoder layer): the sum is rounded to the model
dtype, the statistics are fp32, the normalised row is rounded to the model dtype before the weight multiply.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + c, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Returns rmsnorm(x) * weight, or with a residual (out, x + residual). Inputs are left unchanged."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = shape[-1]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty(x2.shape, dtype=residual.dtype, device=x.device)
    else:
        r2 = res_out = x2   # unused pointer slots
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, n, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


__all__ = ["rmsnorm"]
