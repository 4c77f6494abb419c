"""A correct float -> e4m3 conversion for the Triton interpreter (CPU only; compiled kernels are untouched).

The interpreter of triton 3.9 converts floats down to fp8 with its own bit arithmetic, which drops the carry when
rounding overflows the mantissa (7.93 -> 4.0 instead of 8.0) and rounds ties away from zero (triton-lang/triton
PR #11897 fixes it upstream). Compiled kernels use the hardware conversion (round to nearest even, as torch does).
So that the fp8 kernels run unchanged under TRITON_INTERPRET=1 and give what the GPU gives, the interpreter's
float -> float8e4nv conversion is routed through torch's; every other conversion keeps the interpreter's own.
Loads (e4m3 -> wider floats) are exact in the interpreter and need nothing.
"""
from __future__ import annotations

import os

import numpy as np
import torch

_PATCHED = False


def use_torch_fp8_conversion_in_interpreter() -> None:
    """Idempotent; does nothing unless the Triton interpreter is on."""
    global _PATCHED
    if _PATCHED or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, _ir

    original = InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        source = src.dtype.scalar
        if (dst_type.scalar != tl.float8e4nv or rounding_mode != _ir.ROUNDING_MODE.RTNE
                or source not in (tl.float32, tl.float16, tl.bfloat16)):
            return original(self, src, dst_type, rounding_mode)
        data = np.ascontiguousarray(src.data)
        if source == tl.bfloat16:   # the interpreter keeps bfloat16 as its uint16 bits: the top half of a float32
            data = (data.astype(np.uint32) << np.uint32(16)).view(np.float32)
        wide = torch.from_numpy(data.astype(np.float32))   # exact: every source value is a float32
        return TensorHandle(wide.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), dst_type.scalar)

    InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    _PATCHED = True
