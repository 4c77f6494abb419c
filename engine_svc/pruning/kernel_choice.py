"""Which 2:4 linears run on the sparse kernels: decided per weight shape by a measurement at load.

For each distinct (out, in) shape among the decoder linears, one of its weights is timed dense and compressed at
batch sizes MEASURED_BATCHES (those above the engine's token budget dropped): the shape goes sparse when the
geometric mean of dense time / sparse time over those batches exceeds MIN_SPEEDUP. One format per shape (both
would cost the memory the sparse one saves), so a shape that wins at prefill sizes and loses at decode sizes is
judged over both. The measurement and the conversion are passed in, so the choice is testable without a GPU.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine_svc.pruning.semi_sparse_linear import compress_weight, shape_fits

_LOG = logging.getLogger("tandem.engine.sparsity")

MEASURED_BATCHES = (1, 16, 64, 256)
MIN_SPEEDUP = 1.05   # timing noise on a shared GPU stays under 5%; below that, dense is kept

Timings = dict[int, tuple[float, float]]   # batch -> (dense seconds, sparse seconds)


@dataclass(frozen=True)
class ShapeChoice:
    shape: tuple[int, int]     # (out_features, in_features)
    sparse: bool
    speedup: float             # geometric mean of dense / sparse time; nan when not measured
    reason: str


def geometric_speedup(timings: Timings) -> float:
    return math.exp(sum(math.log(dense / sparse) for dense, sparse in timings.values()) / len(timings))


def choose(shape: tuple[int, int], timings: Timings | None) -> ShapeChoice:
    if timings is None:
        return ShapeChoice(shape, False, math.nan, "shape not a multiple of 32 x 64")
    speedup = geometric_speedup(timings)
    return ShapeChoice(shape, speedup > MIN_SPEEDUP, speedup, f"measured x{speedup:.2f} at M={sorted(timings)}")


def measured_batches(max_tokens: int) -> tuple[int, ...]:
    return tuple(m for m in MEASURED_BATCHES if m <= max_tokens) or (1,)


def choose_sparse_linears(linears: list[tuple[str, nn.Linear]], batches: tuple[int, ...],
                          measure: Callable[[nn.Linear, tuple[int, ...]], Timings],
                          convert: Callable[[nn.Linear], None] = compress_weight) -> list[ShapeChoice]:
    """Measures one linear of each shape, then converts every linear whose shape chose sparse. Returns the choices,
    one per shape, in the order the shapes first appear."""
    choices: dict[tuple[int, int], ShapeChoice] = {}
    for _, linear in linears:
        shape = (linear.out_features, linear.in_features)
        if shape not in choices:
            choices[shape] = choose(shape, measure(linear, batches) if shape_fits(*shape) else None)
    for _, linear in linears:
        if choices[(linear.out_features, linear.in_features)].sparse:
            convert(linear)
    return list(choices.values())


@torch.no_grad()
def cuda_timings(linear: nn.Linear, batches: tuple[int, ...], iters: int = 50) -> Timings:
    """Median of `iters` CUDA-event timings of F.linear with the layer's dense weight and with its compressed copy,
    at each batch size."""
    from torch.nn import functional as F
    from torch.sparse import to_sparse_semi_structured

    dense = linear.weight.detach()
    sparse = to_sparse_semi_structured(dense)
    out: Timings = {}
    for m in batches:
        x = torch.randn(m, dense.shape[1], device=dense.device, dtype=dense.dtype)
        out[m] = (median_ms(lambda: F.linear(x, dense), iters), median_ms(lambda: F.linear(x, sparse), iters))
    del sparse
    return out


def median_ms(fn: Callable[[], torch.Tensor], iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def describe(choices: list[ShapeChoice]) -> str:
    parts = [f"{c.shape[0]}x{c.shape[1]} {'sparse' if c.sparse else 'dense'} ({c.reason})" for c in choices]
    return "2:4 kernels per shape: " + "; ".join(parts)


def apply_sparse_kernels(linears: list[tuple[str, nn.Linear]], max_tokens: int) -> list[ShapeChoice]:
    choices = choose_sparse_linears(linears, measured_batches(max_tokens), cuda_timings)
    _LOG.info(describe(choices))
    return choices
