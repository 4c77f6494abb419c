"""Llama-family decoder (Llama 2/3, SmolLM): RMSNorm, RoPE, GQA, SwiGLU, optionally tied embeddings.

q/k/v are fused into one qkv_proj and gate/up into gate_up_proj (one matmul each); load_weights maps HF names onto
those shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from engine_svc.attention import AttentionBackend, AttentionMetadata, KVCache
from engine_svc.distributed.layers import gather_logits, lm_head_rows, row_parallel_linear, vocab_embedding
from engine_svc.distributed.parallel_state import current_pp, current_tp
from engine_svc.distributed.pipeline import MissingLayer, StageNames
from engine_svc.distributed.partition import ModelShard, model_shard
from engine_svc.distributed.read_part import read_part, shard_part
from engine_svc.model_config import ModelConfig
from engine_svc.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul


@dataclass(frozen=True)
class LayerOptions:
    """What the Llama-shaped families change in a decoder layer (see each family's layer_options)."""
    qkv_bias: bool = False               # Qwen2
    qk_norm: bool = False                # Qwen3: RMSNorm over each head of q and k, before RoPE
    o_bias: bool = False                 # Qwen3 with attention_bias
    sliding_window: int | None = None    # Mistral (where set): a query sees only the last this-many keys


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: AttentionBackend,
                 options: LayerOptions = LayerOptions()) -> None:
        super().__init__()
        tp = current_tp()
        heads = model_shard(cfg, tp.size, tp.rank).heads   # this rank's heads (all of them at size 1)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=options.qkv_bias)
        self.o_proj = row_parallel_linear((heads.q_start * cfg.head_dim, heads.q_stop * cfg.head_dim),
                                          cfg.num_heads * cfg.head_dim, cfg.hidden_size, options.o_bias, tp)
        if options.qk_norm:   # the reference norm: the fused kernel takes 2-D rows, these are [tokens, heads, dim]
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = options.qk_norm
        self.sliding_window = options.sliding_window
        self.scale = self.head_dim ** -0.5
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(paged_self_attention(self, self.qkv_proj(x), positions, kv_cache, meta))


def paged_self_attention(attn: nn.Module, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                         meta: AttentionMetadata) -> torch.Tensor:
    """The attention core shared by the families: splits a fused [q | k | v] projection into heads, applies the
    per-head q/k norms when the layer has them, then RoPE; writes this step's K/V and attends over the paged cache
    (RoPE and the write are one backend call, which the Triton backend fuses into one kernel).
    attn carries num_heads, num_kv_heads, head_dim, q_size, kv_size, scale, rope, backend (and optionally qk_norm
    with q_norm/k_norm, sliding_window). Returns [tokens, q_size]."""
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(-1, attn.num_heads, attn.head_dim)
    k = k.view(-1, attn.num_kv_heads, attn.head_dim)
    v = v.view(-1, attn.num_kv_heads, attn.head_dim)
    if getattr(attn, "qk_norm", False):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = attn.backend.rope_and_write_kv(attn.rope, positions, q, k, v, kv_cache, meta)   # Triton: one launch
    o = attn.backend.forward(q, kv_cache.data, meta, attn.scale, window=getattr(attn, "sliding_window", None),
                             kv_scales=kv_cache.scales)
    return o.reshape(-1, attn.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        tp = current_tp()
        shard = model_shard(cfg, tp.size, tp.rank)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * shard.mlp_size, bias=False)
        self.down_proj = row_parallel_linear(shard.mlp, cfg.intermediate_size, cfg.hidden_size, False, tp)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.fused))


class LlamaDecoderLayer(nn.Module):
    """Takes and returns (hidden, residual): the residual stream is added to each sublayer's output by the norm
    that follows it (residual = hidden + residual; hidden = norm(residual)), which is the same arithmetic as
    x = x + sublayer(norm(x)) and lets the fused kernel do add and norm in one pass."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: AttentionBackend, fused: bool,
                 options: LayerOptions = LayerOptions()) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.self_attn = LlamaAttention(cfg, rope, backend, options)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.mlp = LlamaMLP(cfg, fused)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embeddings are the residual stream
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Under pipeline parallelism, one stage's part: its layers (the others are MissingLayer, so indices stay
    global), the embedding on the first stage only, the final norm on the last only. A stage before the last
    returns its activations, hidden states and residual stacked as [2, tokens, hidden], which the next stage takes
    as `intermediate` in place of the embedding."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, options: LayerOptions = LayerOptions()) -> None:
        super().__init__()
        # The Triton backend also brings the fused RMSNorm(+residual), RoPE and SwiGLU kernels.
        fused = backend.name == "triton"
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                    fused)
        tp, pp = current_tp(), current_pp()
        self.start, self.stop = pp.layer_range(cfg.num_layers)
        self.embed_tokens = vocab_embedding(cfg.vocab_size, model_shard(cfg, tp.size, tp.rank).vocab,
                                            cfg.hidden_size, tp) if pp.is_first else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rope, backend, fused, options)
                                    if self.start <= i < self.stop else MissingLayer()
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused) if pp.is_last else None
        self.row_decode = None   # a single token's step in compiled calls (engine_svc.models.row_decode), if set

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """kv_caches: this stage's layers' caches, in order."""
        if self.row_decode is not None and input_ids.shape[0] == 1 and intermediate is None:
            return self.row_decode(input_ids, positions, kv_caches, meta)
        if intermediate is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate[0], intermediate[1]
        for layer, kv_cache in zip(self.layers[self.start:self.stop], kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        if self.norm is None:
            return torch.stack((x, residual))
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]


# HF checkpoint name suffix -> (our parameter suffix, shard index within the fused parameter)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


# HF module -> its tensors' role in the tensor-parallel partition (read_part.shard_part); others are held whole.
_ROLES = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp",
          "o_proj": "attention_output", "down_proj": "mlp_output", "embed_tokens": "vocab", "lm_head": "vocab"}


def fused_module_name(hf_module: str) -> str:
    """The module of ours that holds an HF module's weight: model.layers.0.self_attn.q_proj -> ...qkv_proj."""
    parent, _, leaf = hf_module.rpartition(".")
    fused = _FUSED.get(leaf)
    return f"{parent}.{fused[0]}" if fused else hf_module


def loadable_tensors(model: nn.Module, remove_duplicate: bool = False) -> dict[str, torch.Tensor]:
    """What a checkpoint fills: the parameters, and every buffer of the quantized linears (int4 / int8 formats:
    qweight, scales, offsets and their bias), whose rows are output features like a weight's, so fused shards
    split them the same way."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=remove_duplicate))
    for prefix, module in model.named_modules(remove_duplicate=remove_duplicate):
        if "qweight" in module._buffers:
            tensors.update((f"{prefix}.{name}", buf) for name, buf in module.named_buffers(recurse=False))
    return tensors


_STAGE_NAMES = StageNames(layers="model.layers.", embedding="model.embed_tokens.",
                          last_stage=("model.norm.", "lm_head."))


class LlamaForCausalLM(nn.Module):
    supports_pipeline_parallel = True
    stage_streams = 2   # a stage's activations: the hidden states and the residual stream

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp, self.pp = current_tp(), current_pp()
        self.shard: ModelShard = model_shard(cfg, self.tp.size, self.tp.rank)
        self.model = LlamaModel(cfg, backend, self.layer_options(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, lm_head_rows(cfg.vocab_size, self.shard.vocab, self.tp),
                                 bias=False) if self.pp.is_last else None
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the input embedding with lm_head (the loader calls it again after to_empty). Split over pipeline
        stages, the first holds the embedding and the last its own copy as lm_head, read from the same tensor."""
        if self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def layer_options(cls, cfg: ModelConfig) -> LayerOptions:
        """Families built from these layers (Qwen2, Qwen3, Mistral) override this."""
        return LayerOptions()

    def init_buffers(self, device: torch.device) -> None:
        """Builds non-parameter tables (rope) on the device; needed after construction on the meta device."""
        self.model.rope.build(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.lm_head(hidden), self.cfg.vocab_size, self.tp).float()

    def fused_shard_sizes(self, fused: str) -> list[int]:
        """Rows of each HF projection within a fused parameter (this rank's rows under tensor parallelism)."""
        h, d = self.shard.heads, self.cfg.head_dim
        if fused == "qkv_proj":
            return [h.num_heads * d, h.num_kv_heads * d, h.num_kv_heads * d]
        return [self.shard.mlp_size, self.shard.mlp_size]

    def checkpoint_part(self, name: str, local: torch.Tensor) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the HF tensor `name` that this rank holds, None for the whole tensor: rows of the
        column-parallel projections and of the vocabulary, input columns of the row-parallel ones (local: the
        rank's tensor it fills, which sizes a quantized layer's packed columns)."""
        if self.tp.size == 1:
            return None
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name.split(".")[0]
        return shard_part(_ROLES.get(module), self.shard, self.cfg.head_dim, local)

    def stage_name(self, name: str) -> str | None:
        return _STAGE_NAMES.on_stage(name, self.pp, (self.model.start, self.model.stop), self.cfg.tie_word_embeddings)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF-named tensors into parameters; returns the parameter names that were filled."""
        params = loadable_tensors(self)
        filled: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            name = self.stage_name(hf_name)
            if name is None:
                continue
            parts = name.rsplit(".", 2)
            fused = _FUSED.get(parts[-2]) if len(parts) == 3 else None
            if fused is not None:
                target = f"{parts[0]}.{fused[0]}.{parts[-1]}"
                sizes = self.fused_shard_sizes(fused[0])
                offset = sum(sizes[:fused[1]])
                param = params[target]
                param.data[offset:offset + sizes[fused[1]]].copy_(read_part(tensor, self.checkpoint_part(name, param)))
                filled.add(f"{target}#{fused[1]}")
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            part = read_part(tensor, self.checkpoint_part(name, params[name]))
            params[name].data[:part.shape[0]].copy_(part)   # a vocabulary shard may be shorter than its padding
            filled.add(name)
        return filled

    def expected_weights(self) -> set[str]:
        names: set[str] = set()
        for name in loadable_tensors(self, remove_duplicate=True):
            leaf = name.rsplit(".", 2)
            if len(leaf) == 3 and leaf[-2] in ("qkv_proj", "gate_up_proj"):
                names.update(f"{name}#{i}" for i in range(len(self.fused_shard_sizes(leaf[-2]))))
            else:
                names.add(name)
        return names
