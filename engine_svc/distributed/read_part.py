"""This rank's part of a checkpoint tensor. Under tensor parallelism the loaders yield lazy tensors (safetensors'
get_slice, engine_svc.loader.gguf_lazy's GGUF tensors) that read only the bytes of the rows or columns asked for; a
torch tensor (a single-process load, or a stream that converts whole tensors) is narrowed instead."""
from __future__ import annotations

from fractions import Fraction

import torch

from engine_svc.distributed.partition import ModelShard


def read_part(tensor, part: tuple[int, int, int] | None) -> torch.Tensor:
    """part: (dim, start, stop) along dim 0 (rows) or 1 (columns), or None for the whole tensor."""
    if isinstance(tensor, torch.Tensor):
        return tensor if part is None else tensor.narrow(part[0], part[1], part[2] - part[1])
    if part is None:
        return tensor[:]
    dim, start, stop = part
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]


def read_rows(tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Rows [a, b) of each range, concatenated in the order given."""
    return torch.cat([read_part(tensor, (0, a, b)) for a, b in ranges], dim=0)


def input_part(local: torch.Tensor, start: int, stop: int) -> tuple[int, int, int] | None:
    """The part of a row-parallel layer's checkpoint tensor that holds input features [start, stop), sized from
    local, the rank's tensor it fills: a weight's columns, a quantized layer's packed weight or group scales in
    proportion to their width (int4: two features a byte, one scale a group); None for a 1-D tensor (a bias, per-row
    scales), held whole. The features must split on the tensor's column boundaries (whole groups, whole bytes)."""
    if local.dim() == 1:
        return None
    per_feature = Fraction(local.shape[1], stop - start)
    a, b = start * per_feature, stop * per_feature
    if a.denominator != 1 or b.denominator != 1:
        raise ValueError(f"input features [{start}, {stop}) do not split on the boundaries of a tensor with "
                         f"{per_feature} columns per feature")
    return 1, int(a), int(b)


def shard_part(role: str | None, shard: ModelShard, head_dim: int,
               local: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, start, stop) of a checkpoint tensor a rank holds, by the tensor's role in the partition: rows of its
    query heads ("q"), K/V heads ("kv"), intermediate features ("mlp") or vocabulary ("vocab"); input columns of
    the attention output ("attention_output") or of the MLP's down projection ("mlp_output"), sized from local
    (input_part); None (role None) for a tensor every rank holds whole."""
    h, d = shard.heads, head_dim
    if role == "q":
        return 0, h.q_start * d, h.q_stop * d
    if role == "kv":
        return 0, h.kv_start * d, h.kv_stop * d
    if role == "mlp":
        return 0, *shard.mlp
    if role == "vocab":
        return 0, shard.vocab.start, shard.vocab.stop
    if role == "attention_output":
        return input_part(local, h.q_start * d, h.q_stop * d)
    if role == "mlp_output":
        return input_part(local, *shard.mlp)
    if role is None:
        return None
    raise ValueError(f"unknown tensor-parallel role {role!r}")
