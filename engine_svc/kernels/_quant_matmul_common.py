"""Shared by the quantized matmul kernels (int8_matmul, int4_matmul): the split-K heuristic, the kernel that sums
the splits' fp32 partials (adding the bias and rounding to the output dtype).

Split-K: when the output tiles alone would leave SMs idle (small M, small N), the K range is cut into `splits`
contiguous slices; each program writes an fp32 partial [M, N] for its slice and one extra launch sums them. The
partials keep the result independent of program order (no atomics), so runs are bitwise reproducible.
"""
from __future__ import annotations

import torch
from engine_svc.kernels import _triton_mode  # noqa: F401 - first: picks the interpreter without CUDA
import triton
import triton.language as tl

MIN_K_TILES_PER_SPLIT = 4     # a split streams at least this many K tiles: less and the reduction costs more
REDUCE_BLOCK_N = 256
INTERPRETER_GEMV_BLOCK_N = 256   # the interpreter pays per program, not per element: few wide programs off CUDA

_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached); None elsewhere."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def choose_split_k(output_tiles: int, k_tiles: int, device: torch.device) -> int:
    """About two programs per SM when the output tiles alone are fewer than the SMs; 1 off CUDA."""
    sms = num_sms(device)
    if sms is None or output_tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, output_tiles), k_tiles // MIN_K_TILES_PER_SPLIT))


def gemv_block_n(n: int, device: torch.device, cuda_block_n: int, block_n: int | None) -> int:
    """Output rows per GEMV program: block_n if given, else the kernel's CUDA tiling, or wide programs when the
    Triton interpreter runs the kernel (the arithmetic per row is the same)."""
    if block_n is not None:
        return block_n
    if device.type == "cuda":
        return cuda_block_n
    return min(INTERPRETER_GEMV_BLOCK_N, max(cuda_block_n, triton.next_power_of_2(n)))


@triton.jit
def _reduce_splits_kernel(part_ptr, bias_ptr, out_ptr, n, splits, stride_ps, stride_pm, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = c < n
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * stride_ps + row * stride_pm + c, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + c, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[m, n] = sum_s partials[s, m, n] (+ bias[n]), rounded once to out's dtype."""
    splits, m, n = partials.shape
    block = min(REDUCE_BLOCK_N, triton.next_power_of_2(n))
    _reduce_splits_kernel[(m, triton.cdiv(n, block))](
        partials, bias if bias is not None else partials, out, n, splits,
        partials.stride(0), partials.stride(1), out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block)
    return out


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """[..., K] -> [M, K] with a unit stride along K (the kernels' layout)."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
