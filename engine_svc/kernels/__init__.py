"""Triton kernels for the engine: paged attention (decode with split-KV, prefill over a cached prefix), KV cache
writes (alone, or after RoPE in the same launch), fused RMSNorm(+residual), RoPE and SwiGLU, and the quantized
matmuls (int8, int4; an int4 GEMV over a layout shuffled at load).

One module per kernel, each with a torch-level wrapper; importing any of them imports triton, and
engine_svc.attention only imports them when the "triton" backend is chosen. This package is the engine's bottom layer
(it imports nothing from the engine above it), so what the kernels and the layers above share lives here in modules
that import no triton: the fp8 arithmetic (fp8_numerics), the fp8 KV cache's scales (kv_scales) and the LoRA token
tile (lora_tile).

Triton decides between compiling and interpreting a function when its @triton.jit decorator runs (TRITON_INTERPRET
is read then), and that includes triton.language's own jitted helpers (tl.sum, tl.max), decorated when triton is
first imported. Without CUDA there is nothing to compile for, so unless the caller chose, the interpreter is switched
on here: the kernels then run, slowly but exactly, on CPU tensors (the tests). That only works if triton itself was
not imported yet (torch may import it on its own, e.g. during a first model load), hence the error that
_triton_mode raises when a Triton kernel module is imported too late (the triton-free modules never raise).

Under the interpreter, float -> fp8 (e4m3) conversions go through torch instead of the interpreter's own, which
rounds wrongly (see _interpreter_fp8.py; kv_write switches it on at import, and rope_kv_write, the other kernel that
stores fp8, imports kv_write).
"""
from __future__ import annotations

import os
import sys

import torch


def choose_interpreter(strict: bool) -> None:
    """Switches the Triton interpreter on when there is no CUDA and the caller did not choose. strict (the Triton
    kernel modules, through _triton_mode): fail when that is too late because triton is already imported. The
    package itself calls it leniently, since importing its triton-free modules (fp8 numerics, the KV scales check,
    the LoRA tile) must work whatever was imported before."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif strict:
        raise ImportError("Triton kernels without CUDA need the Triton interpreter, and triton was imported before "
                          "it could be enabled: set TRITON_INTERPRET=1 in the environment")


choose_interpreter(strict=False)
