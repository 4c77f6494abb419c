"""Megatron-style parallel layers. Column-parallel projections are plain nn.Linear modules holding this rank's
output rows (the loader copies only those rows in); the layers here are the ones that need a collective:
row-parallel linears (one all-reduce of the output, then the bias; the quantized ones are in
engine_svc.quant.row_parallel), the vocabulary-parallel embedding (masked
lookup, one all-reduce) and the logits gather. At size 1 the factories return plain modules, so the
single-process model is exactly what it was."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.distributed.partition import VocabShard


class RowParallel:
    """A linear over this rank's input features [input_part) of full_in_features: partial() is this rank's share
    of the output (no bias), finish() sums the shares over the ranks (one all-reduce) and adds the bias, held whole
    on every rank, once. Callers that add more to the share before the sum (a LoRA update, Falcon's parallel MLP)
    call the two halves themselves; forward is both."""

    tp: TensorParallel
    input_part: tuple[int, int]
    full_in_features: int
    bias: torch.Tensor | None

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.partial(x))

    def set_input_part(self, input_part: tuple[int, int], full_in_features: int, tp: TensorParallel) -> None:
        self.input_part, self.full_in_features, self.tp = input_part, full_in_features, tp


class RowParallelLinear(RowParallel, nn.Linear):
    """Holds the input columns of this rank."""

    def __init__(self, input_part: tuple[int, int], full_in_features: int, out_features: int, bias: bool,
                 tp: TensorParallel) -> None:
        nn.Linear.__init__(self, input_part[1] - input_part[0], out_features, bias=bias)
        self.set_input_part(input_part, full_in_features, tp)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def row_parallel_linear(input_part: tuple[int, int], full_in_features: int, out_features: int, bias: bool,
                        tp: TensorParallel) -> nn.Linear:
    """input_part: [start, stop) of the full_in_features input features this rank holds (all of them at size 1)."""
    if tp.size == 1:
        return nn.Linear(full_in_features, out_features, bias=bias)
    return RowParallelLinear(input_part, full_in_features, out_features, bias, tp)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the embedding (padded to the shard size); ids outside them look up zeros, and the
    all-reduce puts every token's row together."""

    def __init__(self, shard: VocabShard, dim: int, tp: TensorParallel) -> None:
        super().__init__(shard.padded, dim)
        self.shard = shard
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


def vocab_embedding(vocab: int, shard: VocabShard, dim: int, tp: TensorParallel) -> nn.Embedding:
    return nn.Embedding(vocab, dim) if tp.size == 1 else VocabParallelEmbedding(shard, dim, tp)


def lm_head_rows(vocab: int, shard: VocabShard, tp: TensorParallel) -> int:
    """Output rows of this rank's lm_head: the whole vocabulary at size 1, else the padded shard."""
    return vocab if tp.size == 1 else shard.padded


def gather_logits(local: torch.Tensor, vocab: int, tp: TensorParallel) -> torch.Tensor:
    """Every rank's logits for its vocabulary rows -> the full [rows, vocab] (all-gather; every rank gets them,
    the driver samples)."""
    if tp.size == 1:
        return local
    return tp.all_gather_last_dim(local)[..., :vocab]
