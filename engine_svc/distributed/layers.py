"""Megatron-style parallel layers. Column-parallel projections are plain nn.Linear modules holding this rank's
output rows (the loader copies only those rows in); the layers here are the ones that need a collective:
row-parallel linears (one all-reduce of the output, then the bias), the vocabulary-parallel embedding (masked
lookup, one all-reduce) and the logits gather. At size 1 the factories return plain modules, so the
single-process model is exactly what it was."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.distributed.partition import VocabShard


class RowParallelLinear(nn.Linear):
    """Holds the input columns of this rank; the partial products are summed over the ranks, then the bias (held
    whole on every rank) is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def row_parallel_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> nn.Linear:
    if tp.size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


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
