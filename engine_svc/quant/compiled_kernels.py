"""Pure-torch functions compiled by TorchInductor into C++ for fixed input shapes: the CPU's single-row decode work
(the GEMVs over GGUF blocks, and the single-token step between attentions).

The function is traced with make_fx and compiled with torch._inductor.compile: a call then costs about 7 µs on this
machine type, a third of a torch.compile'd function's (whose guards run on every call), which matters at 121 GEMVs
a token. One compilation per function and input shapes, shared by every layer of those shapes. Inductor needs a
C++ compiler at run time; without one, compile_kernel raises and the caller keeps its eager path.

Single-row work runs on one thread (one_thread; the kernels are compiled for one, inductor baking the count into
its loops): a row's ops are too small to gain from splitting, and with a second thread every parallel op forks
and joins, and waits for a scheduler time slice whenever another process holds the other core. Under `tandem
serve` on two cores that happens on every token (the gateway and the tokenizer work on each); on this machine
type, loaded by other jobs, a 0.1 ms KV gather took 12 ms and a step's GEMVs 38 ms instead of 13 on two threads.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

Kernel = Callable[..., torch.Tensor]

_COMPILED: dict[tuple, Kernel] = {}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the block, then back (a switch costs well under a µs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compile_kernel(fn: Callable, example: tuple[torch.Tensor, ...], key=None) -> Kernel:
    """fn compiled, for one thread, for tensors shaped, typed and strided as example (it is run once on them). The
    result takes the same positional tensors and returns what fn returns. key: what, with the shapes, identifies
    fn's computation (default: fn itself); give one for a partial over constants, which is a new object each time."""
    if len({id(t) for t in example}) < len(example):
        raise ValueError("example tensors must be distinct objects: tracing would take one tensor passed twice for "
                         "one input")
    signature = (fn if key is None else key, *((t.shape, t.dtype, t.stride()) for t in example))
    kernel = _COMPILED.get(signature)
    if kernel is None:
        from torch.fx.experimental.proxy_tensor import make_fx
        with torch.no_grad(), one_thread():
            graph = make_fx(fn)(*example)
            kernel = torch._inductor.compile(graph, list(example))
        _COMPILED[signature] = kernel
    return kernel
