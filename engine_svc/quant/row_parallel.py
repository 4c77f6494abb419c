"""The quantized linears as row-parallel layers (engine_svc.distributed.layers.RowParallel): each rank holds the
input columns [input_part) of the weight, computes its share without the bias, and the shares are summed in one
all-reduce before the bias is added once.

What each format needs to split by input columns and still be the single process's weight, cut:
- int8 and fp8 scale each output row by its absolute maximum over the whole row: the ranks take the maximum of
  their columns' maxima (one all-reduce MAX per layer, at load) and quantize their columns with it. fp8 also
  quantizes its activations per token at run time, over the columns the rank holds: a finer scale than one
  process's, so its results differ from one process's by that rounding only (one more all-reduce per layer and
  step would be the price of making them equal).
- int4 groups run along the input features: a rank's columns must begin and end on a group boundary, with the
  group the whole layer would take (so a rank's groups are the single process's); a split that does not is
  refused by name.
- packed checkpoints (GGUF, AWQ, GPTQ) arrive already quantized: their packed columns and group scales are cut in
  proportion (engine_svc.distributed.read_part.input_part), a whole row's scale is kept whole.
"""
from __future__ import annotations

import torch
from torch import nn

from engine_svc.distributed.layers import RowParallel
from engine_svc.quant.fp8_linear import Fp8Linear
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear


class RowParallelInt8Linear(RowParallel, Int8Linear):
    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, None)


class RowParallelInt4Linear(RowParallel, Int4Linear):
    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, None)


class RowParallelFp8Linear(RowParallel, Fp8Linear):
    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, None)


def row_parallel_group(layer: RowParallel, group_size: int) -> int:
    """group_size, checked to split layer's input features between the ranks on group boundaries."""
    start, stop = layer.input_part
    if start % group_size or stop % group_size:
        raise ValueError(f"int4 groups of {group_size} input features cannot be split over the tensor-parallel "
                         f"ranks: rank {layer.tp.rank} holds input features [{start}, {stop}) of "
                         f"{layer.full_in_features}, which do not begin and end on a group boundary (choose a "
                         f"--tensor-parallel-size whose shards are whole groups)")
    return group_size


def _placed(module: RowParallel, like: RowParallel) -> RowParallel:
    module.set_input_part(like.input_part, like.full_in_features, like.tp)
    return module


def _whole_row_absmax(linear: nn.Linear) -> torch.Tensor:
    return linear.tp.max_(linear.weight.detach().float().abs().amax(dim=1))


@torch.no_grad()
def quantize_row_parallel(linear: RowParallel, method: str, group_size: int, use_triton: bool,
                          emulate_fp8: bool) -> RowParallel:
    """A float row-parallel linear -> its quantized form (round to nearest, as quantize_model does for a whole
    layer). group_size: the int4 group the whole layer takes. Every rank calls this for the same layers in the
    same order (int8 and fp8 take an all-reduce each)."""
    if method == "int8":
        module = RowParallelInt8Linear.from_linear(linear, use_triton, row_absmax=_whole_row_absmax(linear))
    elif method == "fp8":
        module = RowParallelFp8Linear.from_linear(linear, emulate_fp8, row_absmax=_whole_row_absmax(linear))
    elif method == "int4":
        module = RowParallelInt4Linear.from_linear(linear, row_parallel_group(linear, group_size), use_triton)
    else:
        raise ValueError(f"unknown quantization {method!r}")
    return _placed(module, linear)


def empty_row_parallel(linear: RowParallel, kind: str, group_size: int, dtype: torch.dtype,
                       device: torch.device | str, use_triton: bool) -> RowParallel:
    """An empty int4 / int8 row-parallel linear for a packed checkpoint to fill (group_size: the whole layer's)."""
    bias = linear.bias is not None
    if kind == "int8":
        module = RowParallelInt8Linear(linear.in_features, linear.out_features, bias, dtype, device, use_triton)
    else:
        module = RowParallelInt4Linear(linear.in_features, linear.out_features, row_parallel_group(linear, group_size),
                                       bias, dtype, device, use_triton)
    return _placed(module, linear)
