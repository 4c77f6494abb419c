"""Mistral: the Llama decoder with an optional sliding window (config `sliding_window`, null or absent for none),
in which a query at position p attends only to keys at positions p - window < j <= p. head_dim may be set in the
config independently of hidden_size / heads (ModelConfig reads it), as for Llama."""
from __future__ import annotations

from engine_svc.model_config import ModelConfig
from engine_svc.models.llama import LayerOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, cfg: ModelConfig) -> LayerOptions:
        window = cfg.extra.get("sliding_window")
        return LayerOptions(sliding_window=int(window) if window is not None else None)
