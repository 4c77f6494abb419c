"""Falcon (7B/40B/180B, Falcon2-11B): LayerNorm with bias, RoPE, GELU MLP, and one of three K/V layouts behind one
fused `query_key_value` projection:

* multi_query (Falcon-7B): all query heads share one K/V head;
* new_decoder_architecture (Falcon-40B/180B): num_kv_heads groups (grouped-query attention);
* neither: plain multi-head attention.

HF stores the fused projection grouped per K/V head: for each group, its query heads, then its key head, then its
value head (multi_query is one group of all the query heads; multi-head is num_heads groups of one). load_weights
reorders those rows into [all q | all k | all v], so forward splits the projection the way the Llama layers do and
the attention backend sees ordinary GQA (query head i uses K/V head i // (heads / kv_heads)).

Decoder layer: parallel_attn adds attention and MLP of the same input to the residual (x + attn(ln(x)) +
mlp(ln'(x))), with two norms (ln_attn, ln_mlp) or a single input_layernorm as num_ln_in_parallel_attn says (the
new decoder architecture defaults to two); otherwise sequential, with post_attention_layernorm before the MLP.
ALiBi checkpoints (alibi=True, e.g. Falcon-RW) are refused at construction.

Under tensor parallelism the layout splits as the Llama family's does (engine_svc.distributed.partition): the
fused projection is column-parallel (each rank reads the rows of its query heads and K/V heads out of HF's grouped
layout; multi-query's one K/V head is replicated on every rank), dense and dense_4h_to_h are row-parallel, and a
parallel block sums the attention's and the MLP's shares in one all-reduce instead of one each.

Under pipeline parallelism a stage holds its run of layers (the embedding on the first stage, ln_f and lm_head on
the last) and passes on one stream, the hidden states: Falcon's layers add to x itself, with no separate residual.

Module names follow the HF checkpoint (transformer.word_embeddings, transformer.h.N..., transformer.ln_f), so every
tensor but the fused projection loads by name.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.attention import AttentionBackend, AttentionMetadata, KVCache
from engine_svc.distributed.layers import (RowParallel, gather_logits, lm_head_rows, row_parallel_linear,
                                           vocab_embedding)
from engine_svc.distributed.parallel_state import current_pp, current_tp
from engine_svc.distributed.pipeline import MissingLayer, StageNames
from engine_svc.distributed.partition import ModelShard, model_shard
from engine_svc.distributed.read_part import read_part, read_rows, shard_part
from engine_svc.model_config import ModelConfig
from engine_svc.models.layers import RotaryEmbedding
from engine_svc.models.llama import loadable_tensors, paged_self_attention

_GELU_APPROXIMATION = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


class FalconOptions:
    """The Falcon switches read from the HF config (cfg.extra), with HF's defaults, checked once."""

    def __init__(self, cfg: ModelConfig) -> None:
        x = cfg.extra
        if x.get("alibi"):
            raise ValueError(f"{cfg.name}: Falcon with ALiBi (alibi=True) is not supported; only rotary position "
                             "embeddings are")
        self.new_decoder_architecture = bool(x.get("new_decoder_architecture", False))
        self.parallel_attn = bool(x.get("parallel_attn", True))
        self.bias = bool(x.get("bias", False))
        num_ln = x.get("num_ln_in_parallel_attn")
        if num_ln is None:
            num_ln = 2 if self.new_decoder_architecture else 1
        self.two_norms = self.parallel_attn and num_ln == 2
        if self.new_decoder_architecture and not self.parallel_attn:
            # transformers cannot run this combination either (its layer never defines the MLP's input).
            raise ValueError(f"{cfg.name}: Falcon with new_decoder_architecture=True needs parallel_attn=True")
        activation = x.get("activation", "gelu")
        if activation not in _GELU_APPROXIMATION:
            raise ValueError(f"{cfg.name}: unsupported Falcon activation {activation!r}; "
                             f"supported: {', '.join(sorted(_GELU_APPROXIMATION))}")
        self.gelu_approximation = _GELU_APPROXIMATION[activation]
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise ValueError(f"{cfg.name}: Falcon needs hidden_size = heads x head_dim "
                             f"({cfg.hidden_size} != {cfg.num_heads} x {cfg.head_dim})")


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FalconOptions, rope: RotaryEmbedding,
                 backend: AttentionBackend) -> None:
        super().__init__()
        tp = current_tp()
        heads = model_shard(cfg, tp.size, tp.rank).heads   # this rank's heads (all of them at size 1)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Rows in [q | k | v] order once loaded (see FalconForCausalLM.load_weights), not HF's grouped order.
        self.query_key_value = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=opts.bias)
        self.dense = row_parallel_linear((heads.q_start * cfg.head_dim, heads.q_stop * cfg.head_dim),
                                         cfg.num_heads * cfg.head_dim, cfg.hidden_size, opts.bias, tp)
        self.scale = self.head_dim ** -0.5
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.dense(self.heads(x, positions, kv_cache, meta))

    def heads(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
              meta: AttentionMetadata) -> torch.Tensor:
        """The attention output before the dense projection: [tokens, this rank's q_size]."""
        return paged_self_attention(self, self.query_key_value(x), positions, kv_cache, meta)


class FalconMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FalconOptions) -> None:
        super().__init__()
        tp = current_tp()
        shard = model_shard(cfg, tp.size, tp.rank)
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, shard.mlp_size, bias=opts.bias)
        self.dense_4h_to_h = row_parallel_linear(shard.mlp, cfg.intermediate_size, cfg.hidden_size, opts.bias, tp)
        self.approximation = opts.gelu_approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activations before the down projection: [tokens, this rank's intermediate features]."""
        return F.gelu(self.dense_h_to_4h(x), approximate=self.approximation)


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FalconOptions, rope: RotaryEmbedding,
                 backend: AttentionBackend) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps   # ModelConfig reads Falcon's layer_norm_epsilon into this field
        self.parallel = opts.parallel_attn
        self.two_norms = opts.two_norms
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=eps)
            self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = FalconAttention(cfg, opts, rope, backend)
        self.mlp = FalconMLP(cfg, opts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        if self.parallel and isinstance(self.self_attention.dense, RowParallel):
            # Both shares summed in one all-reduce, not one per projection; the biases are added once, after it.
            dense, down = self.self_attention.dense, self.mlp.dense_4h_to_h
            share = dense.partial(self.self_attention.heads(attn_in, positions, kv_cache, meta))
            out = down.finish(share.add_(down.partial(self.mlp.hidden(mlp_in))))
            return x + (out if dense.bias is None else out + dense.bias)
        attn = self.self_attention(attn_in, positions, kv_cache, meta)
        if self.parallel:
            return x + (self.mlp(mlp_in) + attn)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconModel(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: FalconOptions, backend: AttentionBackend) -> None:
        super().__init__()
        # The Triton backend's fused RoPE rotates q and k in place; they are views of the projection, as in Llama.
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                    fused=backend.name == "triton")
        tp, pp = current_tp(), current_pp()
        self.start, self.stop = pp.layer_range(cfg.num_layers)
        self.word_embeddings = vocab_embedding(cfg.vocab_size, model_shard(cfg, tp.size, tp.rank).vocab,
                                               cfg.hidden_size, tp) if pp.is_first else None
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, opts, self.rope, backend)
                               if self.start <= i < self.stop else MissingLayer() for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if pp.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """kv_caches: this stage's layers' caches, in order. A stage before the last returns [1, tokens, hidden]."""
        x = self.word_embeddings(input_ids) if intermediate is None else intermediate[0]
        for layer, kv_cache in zip(self.h[self.start:self.stop], kv_caches, strict=True):
            x = layer(x, positions, kv_cache, meta)
        return x.unsqueeze(0) if self.ln_f is None else self.ln_f(x)


# HF module -> its tensors' role in the tensor-parallel partition (read_part.shard_part); others are held whole.
_ROLES = {"dense_h_to_4h": "mlp", "dense": "attention_output", "dense_4h_to_h": "mlp_output",
          "word_embeddings": "vocab", "lm_head": "vocab"}


_STAGE_NAMES = StageNames(layers="transformer.h.", embedding="transformer.word_embeddings.",
                          last_stage=("transformer.ln_f.", "lm_head."))


class FalconForCausalLM(nn.Module):
    supports_pipeline_parallel = True
    stage_streams = 1   # the hidden states

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp, self.pp = current_tp(), current_pp()
        self.shard: ModelShard = model_shard(cfg, self.tp.size, self.tp.rank)
        self.options = FalconOptions(cfg)
        self.transformer = FalconModel(cfg, self.options, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, lm_head_rows(cfg.vocab_size, self.shard.vocab, self.tp),
                                 bias=False) if self.pp.is_last else None
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Split over pipeline stages, the last stage's lm_head is its own copy of the embedding (stage_name)."""
        if self.lm_head is not None and self.transformer.word_embeddings is not None:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def init_buffers(self, device: torch.device) -> None:
        self.transformer.rope.build(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.lm_head(hidden), self.cfg.vocab_size, self.tp).float()

    def qkv_rows(self) -> list[tuple[int, int]]:
        """The rows of HF's grouped query_key_value (per K/V head: its query heads, its key, its value) that make
        this rank's [q | k | v], in that order: its query heads, then its K/V heads' keys, then their values. The
        same for a weight, a bias, or a quantized layer's row-major buffers."""
        c, h, d = self.cfg, self.shard.heads, self.cfg.head_dim
        per_group = c.num_heads // c.num_kv_heads
        stride = per_group + 2        # heads of one group in HF's layout

        def head_rows(g: int, j: int, n: int = 1) -> tuple[int, int]:   # heads j..j+n of group g
            return (g * stride + j) * d, (g * stride + j + n) * d

        q: list[tuple[int, int]] = []
        for i in range(h.q_start, h.q_stop):
            a, b = head_rows(*divmod(i, per_group))
            if q and q[-1][1] == a:   # consecutive heads of one group are adjacent rows: one read
                q[-1] = (q[-1][0], b)
            else:
                q.append((a, b))
        groups = range(h.kv_start, h.kv_stop)
        return q + [head_rows(g, per_group) for g in groups] + [head_rows(g, per_group + 1) for g in groups]

    def checkpoint_part(self, name: str, local: torch.Tensor) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the HF tensor `name` this rank holds (query_key_value aside: qkv_rows): rows of
        the column-parallel projection and of the vocabulary, input columns of the row-parallel ones."""
        if self.tp.size == 1:
            return None
        return shard_part(_ROLES.get(name.rsplit(".", 2)[-2]), self.shard, self.cfg.head_dim, local)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = loadable_tensors(self)
        filled: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            name = _STAGE_NAMES.on_stage(hf_name, self.pp, (self.transformer.start, self.transformer.stop),
                                         self.cfg.tie_word_embeddings)
            if name is None:
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            if ".self_attention.query_key_value." in name:   # rows: a weight's, and a quantized one's buffers
                part = read_rows(tensor, self.qkv_rows())
            else:
                part = read_part(tensor, self.checkpoint_part(name, params[name]))
            params[name].data[:part.shape[0]].copy_(part)   # a vocabulary shard may be shorter than its padding
            filled.add(name)
        return filled

    def expected_weights(self) -> set[str]:
        return set(loadable_tensors(self, remove_duplicate=True))
