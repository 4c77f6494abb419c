"""Which layout the int4 GEMV (decode calls of at most GEMV_MAX_ROWS rows) reads, the engine's --int4-gemv-layout,
applied once the model is loaded to every Int4Linear on the Triton kernels:

- plain (the default): int4_matmul's GEMV over the int4 buffers as loaded;
- shuffled: a copy pre-shuffled at load so that each GEMV program streams one contiguous run per iteration
  (engine_svc.kernels.int4_gemv_shuffled): the same results up to fp32 summation order, and a second copy of the
  int4 weights in memory.

plain stays the default until a GPU run (benchmarks/gpu/issue16.sh: decode_int4 vs decode_int4_shuffled, and
benchmarks.quant_matmul's int4 vs int4-shuffled columns) shows the shuffled one faster.
"""
from __future__ import annotations

from torch import nn

from engine_svc.config import INT4_GEMV_LAYOUTS


def apply_int4_gemv_layout(model: nn.Module, layout: str) -> int:
    """Gives every Triton Int4Linear of model the layout; returns how many took the shuffled one (0 for plain)."""
    from engine_svc.quant.int4_linear import Int4Linear
    if layout not in INT4_GEMV_LAYOUTS:
        raise ValueError(f"unknown int4 GEMV layout {layout!r}; available: {', '.join(INT4_GEMV_LAYOUTS)}")
    if layout == "plain":
        return 0
    shuffled = 0
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.use_triton:
            module.use_shuffled_gemv()
            shuffled += 1
    return shuffled
