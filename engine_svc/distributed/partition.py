"""How a model's heads, MLP and vocabulary split across tensor-parallel ranks.

Query heads go to ranks in whole K/V groups when there are at least as many K/V heads as ranks (unevenly when the
ranks do not divide them: SmolLM2's 3 K/V heads at T=2 give 1 and 2 groups), so each rank's cache holds only its
own K/V heads. With fewer K/V heads than ranks (multi-query, or 8 K/V heads at T=16), each K/V head is replicated on
T / kv ranks and its group's query heads split among them. Either way a rank's query heads share its K/V heads in
the ordinary GQA ratio, which is what the attention backends expect.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine_svc.model_config import ModelConfig


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items split into `parts` contiguous parts as evenly as possible."""
    return index * n // parts, (index + 1) * n // parts


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int

    @property
    def num_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start


def head_shard(num_heads: int, num_kv_heads: int, size: int, rank: int) -> HeadShard:
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        k0, k1 = split_range(num_kv_heads, size, rank)
        return HeadShard(k0 * group, k1 * group, k0, k1)
    per_head = size // num_kv_heads   # ranks sharing one replicated K/V head
    if size % num_kv_heads or group < per_head:
        raise ValueError(f"{num_heads} query heads with {num_kv_heads} K/V heads cannot split over {size} "
                         f"tensor-parallel ranks (the ranks must be a multiple of the K/V heads, and at most the "
                         f"query heads)")
    kv = rank // per_head
    a, b = split_range(group, per_head, rank % per_head)
    return HeadShard(kv * group + a, kv * group + b, kv, kv + 1)


@dataclass(frozen=True)
class VocabShard:
    start: int
    stop: int
    padded: int      # rows every rank holds (the last rank's tail is zero), so logits gather in equal parts

    @property
    def size(self) -> int:
        return self.stop - self.start


def vocab_shard(vocab: int, size: int, rank: int) -> VocabShard:
    padded = -(-vocab // size)
    return VocabShard(min(rank * padded, vocab), min((rank + 1) * padded, vocab), padded)


@dataclass(frozen=True)
class ModelShard:
    """This rank's part of every layer (the same for all layers)."""
    heads: HeadShard
    mlp: tuple[int, int]       # [start, stop) of the intermediate features
    vocab: VocabShard

    @property
    def mlp_size(self) -> int:
        return self.mlp[1] - self.mlp[0]


def model_shard(cfg: ModelConfig, size: int, rank: int) -> ModelShard:
    return ModelShard(head_shard(cfg.num_heads, cfg.num_kv_heads, size, rank),
                      split_range(cfg.intermediate_size, size, rank), vocab_shard(cfg.vocab_size, size, rank))


def rank_local_config(cfg: ModelConfig, shard: ModelShard) -> ModelConfig:
    """cfg with this rank's head and MLP counts: what its KV cache and activations are sized from."""
    from dataclasses import replace
    return replace(cfg, num_heads=shard.heads.num_heads, num_kv_heads=shard.heads.num_kv_heads,
                   intermediate_size=shard.mlp_size)
