"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head of q and k before RoPE, no q/k/v bias unless
`attention_bias` (which, as in the reference, also puts a bias on o_proj), and an explicit head_dim that need not
be hidden_size / heads. Sliding-window layers are read as for Qwen2."""
from __future__ import annotations

from torch import nn

from engine_svc.attention import AttentionBackend
from engine_svc.model_config import ModelConfig
from engine_svc.models.llama import LayerOptions
from engine_svc.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        if cfg.extra.get("attention_bias"):
            # Built in the same device/dtype context as the rest of the model (the loader's meta device).
            for layer in self.model.layers:
                old = layer.self_attn.o_proj
                layer.self_attn.o_proj = nn.Linear(old.in_features, old.out_features, bias=True,
                                                   device=old.weight.device, dtype=old.weight.dtype)

    @classmethod
    def layer_options(cls, cfg: ModelConfig) -> LayerOptions:
        return LayerOptions(qkv_bias=bool(cfg.extra.get("attention_bias", False)), qk_norm=True)
