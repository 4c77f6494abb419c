"""Dynamic per-token fp8 (e4m3) quantization of activations for W8A8, in one kernel per call: each row's absmax
gives its scale (absmax / 448, floored like fp8_numerics.quantize_fp8_rows), and the row is divided,
clamped and rounded to e4m3 (round to nearest even). Rows past M (padding for torch._scaled_mm) come out as zeros
with the floor scale. The unfused torch form took eight kernels per linear layer, several times the cost of
this one at decode shapes."""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

from engine_svc.kernels._interpreter_fp8 import use_torch_fp8_conversion_in_interpreter
from engine_svc.kernels.fp8_numerics import E4M3, E4M3_MAX, SCALE_FLOOR

use_torch_fp8_conversion_in_interpreter()

BLOCK = 2048


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, m, k, stride_x, stride_q, tiny, fp8_max, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k_in = tl.where(row < m, k, 0)   # a padding row reads nothing: zeros
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + tl.minimum(row, m - 1).to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, k, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=(k0 + cols) < k_in, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0) / fp8_max, tiny)
    for k0 in range(0, k, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=(k0 + cols) < k_in, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)
        tl.store(q_ptr + row.to(tl.int64) * stride_q + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=(k0 + cols) < k)
    tl.store(s_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride along K) -> (e4m3 [rows, K], float32 scale [rows, 1]), rows >= M (default M)."""
    m, k = x.shape
    rows = m if rows is None else rows
    assert rows >= m and x.stride(1) == 1
    q = torch.empty(rows, k, dtype=E4M3, device=x.device)
    s = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, q, s, m, k, x.stride(0), q.stride(0), SCALE_FLOOR, E4M3_MAX,
                                       BLOCK=min(BLOCK, triton.next_power_of_2(k)), num_warps=4)
    return q, s
