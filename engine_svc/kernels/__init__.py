"""Triton kernels for the engine: paged attention (decode with split-KV, prefill over a cached prefix), KV cache
writes, and fused RMSNorm(+residual), RoPE and SwiGLU.

One module per kernel, each with a torch-level wrapper; importing any of them imports triton, and
engine_svc.attention only imports them when the "triton" backend is chosen. This package is the engine's bottom layer
(it imports nothing from the engine above it), so what the kernels and the layers above share lives here in modules
that import no triton: the fp8 arithmetic (fp8_numerics), the fp8 KV cache's scales (kv_scales) and the LoRA token
tile (lora_tile).

Triton decides between compiling and interpreting a function when its @triton.jit decorator runs (TRITON_INTERPRET
is read then), and that includes triton.language's own jitted helpers (tl.sum, tl.max), decorated when triton is
first imported. Without CUDA there is nothing to compile for, so unless the caller chose, the interpreter is switched
on here: the kernels then run, slowly but exactly, on CPU tensors (the tests). That only works if triton itself was
not imported yet (torch may import it on its own, e.g. during a first model load), hence the early error.

Under the interpreter, float -> fp8 (e4m3) conversions go through torch instead of the interpreter's own, which
rounds wrongly (see _interpreter_fp8.py; kv_write, the only kernel that stores fp8, switches it on at import).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError("Triton kernels without CUDA need the Triton interpreter, and triton was imported before "
                          "it could be enabled: set TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
