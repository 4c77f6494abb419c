"""Pure-torch functions compiled by TorchInductor into C++ for fixed input shapes (the CPU's batch-1 decode GEMVs).

The function is traced with make_fx and compiled with torch._inductor.compile: a call then costs about 7 µs on this
machine type, a third of a torch.compile'd function's (whose guards run on every call), which matters at 121 GEMVs
a token. One compilation per function and input shapes, shared by every layer of those shapes. Inductor needs a
C++ compiler at run time; without one, compile() raises and the caller keeps its eager path."""
from __future__ import annotations

from typing import Callable

import torch

Kernel = Callable[..., torch.Tensor]

_COMPILED: dict[tuple, Kernel] = {}


def _signature(key, example: tuple[torch.Tensor, ...]) -> tuple:
    # Inductor bakes the thread count into its parallel loops.
    return (key, torch.get_num_threads(), *((t.shape, t.dtype, t.stride()) for t in example))


def compile_kernel(fn: Callable, example: tuple[torch.Tensor, ...], key=None) -> Kernel:
    """fn compiled for tensors shaped, typed and strided as example (it is run once on them). The result takes
    the same positional tensors and returns what fn returns. key: what, with the shapes, identifies fn's
    computation (default: fn itself); give one for a partial over constants, which is a new object each time."""
    if len({id(t) for t in example}) < len(example):
        raise ValueError("example tensors must be distinct objects: tracing would take one tensor passed twice for "
                         "one input")
    signature = _signature(fn if key is None else key, example)
    kernel = _COMPILED.get(signature)
    if kernel is None:
        from torch.fx.experimental.proxy_tensor import make_fx
        with torch.no_grad():
            graph = make_fx(fn)(*example)
            kernel = torch._inductor.compile(graph, list(example))
        _COMPILED[signature] = kernel
    return kernel
