"""Which layout the int4 GEMV (decode calls of at most GEMV_MAX_ROWS rows) reads, chosen once per process from the
environment and applied when a model is loaded (engine_svc.loader.load_model) to every Int4Linear on the Triton
kernels:

    TANDEM_INT4_GEMV_LAYOUT=plain      the default: int4_matmul's GEMV over the int4 buffers as loaded
    TANDEM_INT4_GEMV_LAYOUT=shuffled   a copy pre-shuffled at load so that each GEMV program streams one contiguous
                                       run per iteration (engine_svc.kernels.int4_gemv_shuffled): the same results
                                       up to fp32 summation order, and a second copy of the int4 weights in memory

plain stays the default until a GPU run (benchmarks/gpu/issue16.sh: decode_int4 vs decode_int4_shuffled, and
benchmarks.quant_matmul's int4 vs int4-shuffled columns) shows the shuffled one faster. An environment variable
rather than an engine option: it reaches a load in any process (engine workers, benchmarks) without a new flag
through every front end, while it is an experiment.
"""
from __future__ import annotations

import os

from torch import nn

ENV = "TANDEM_INT4_GEMV_LAYOUT"
LAYOUTS = ("plain", "shuffled")


def chosen_layout() -> str:
    layout = os.environ.get(ENV, "plain").strip() or "plain"
    if layout not in LAYOUTS:
        raise ValueError(f"{ENV}={layout!r}: the int4 GEMV layout must be one of {', '.join(LAYOUTS)}")
    return layout


def apply_int4_gemv_layout(model: nn.Module, layout: str | None = None) -> int:
    """Gives every Triton Int4Linear of model the layout (default: chosen_layout()); returns how many took the
    shuffled one (0 for plain)."""
    from engine_svc.quant.int4_linear import Int4Linear
    layout = chosen_layout() if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown int4 GEMV layout {layout!r}; available: {', '.join(LAYOUTS)}")
    if layout == "plain":
        return 0
    shuffled = 0
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.use_triton:
            module.use_shuffled_gemv()
            shuffled += 1
    return shuffled
