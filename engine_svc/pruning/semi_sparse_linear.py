"""2:4 linears on torch's semi-structured sparse tensors (cuSPARSELt, or CUTLASS where torch has no cuSPARSELt):
the weight keeps its nn.Linear and is swapped for its compressed form (the kept half of the values plus 2-bit
position metadata), which F.linear multiplies on the sparse tensor cores of compute capability >= 8.0."""
from __future__ import annotations

import torch
from torch import nn

KERNEL_DTYPES = (torch.float16, torch.bfloat16)   # the activation dtypes the kernels take (fp32 would run as tf32)
# The weight shapes both backends take in these dtypes: rows a multiple of 32, columns of 64 (CUTLASS's minima;
# cuSPARSELt's, 16 and 16, are looser).
ROW_MULTIPLE, COL_MULTIPLE = 32, 64


def kernels_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 kernels cannot run here (None when they can)."""
    if device.type != "cuda":
        return f"the 2:4 kernels need a CUDA GPU (the engine runs on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the 2:4 kernels need compute capability >= 8.0 (this GPU has {major}.{minor})"
    if dtype not in KERNEL_DTYPES:
        return f"the 2:4 kernels run float16 or bfloat16 (the engine runs {str(dtype).removeprefix('torch.')})"
    return None


def shape_fits(out_features: int, in_features: int) -> bool:
    return out_features % ROW_MULTIPLE == 0 and in_features % COL_MULTIPLE == 0


@torch.no_grad()
def compress_weight(linear: nn.Linear) -> None:
    """Replaces linear.weight (2:4 along its inputs) by its semi-structured sparse form, in place."""
    from torch.sparse import to_sparse_semi_structured
    linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)


def is_compressed(tensor: torch.Tensor) -> bool:
    from torch.sparse import SparseSemiStructuredTensor
    return isinstance(tensor, SparseSemiStructuredTensor)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: a compressed weight's inner tensors (values and metadata), not its dense shape."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or not is_compressed(tensor):
        return tensor.numel() * tensor.element_size()
    return sum(stored_bytes(getattr(tensor, name)) for name in flatten()[0])
