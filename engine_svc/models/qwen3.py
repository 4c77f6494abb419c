"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head of q and k before RoPE, no q/k/v bias unless
`attention_bias` (which, as in the reference, also puts a bias on o_proj), and an explicit head_dim that need not
be hidden_size / heads. Sliding-window layers are read as for Qwen2."""
from __future__ import annotations

from engine_svc.model_config import ModelConfig
from engine_svc.models.llama import LayerOptions
from engine_svc.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def layer_options(cls, cfg: ModelConfig) -> LayerOptions:
        bias = bool(cfg.extra.get("attention_bias", False))
        return LayerOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
