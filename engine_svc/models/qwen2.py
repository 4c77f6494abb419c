"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections, and optionally a sliding window on some
layers (`use_sliding_window`; not implemented by the attention backends yet, which refuse a window)."""
from __future__ import annotations

from engine_svc.attention import AttentionBackend
from engine_svc.model_config import ModelConfig
from engine_svc.models.llama import LayerOptions, LlamaForCausalLM


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    """The attention window of each layer, None for full attention. Qwen2/Qwen3 configs turn the window on with
    use_sliding_window; which layers get it is `layer_types` where the config lists them, else the layers from
    max_window_layers on."""
    extra = cfg.extra
    window = extra.get("sliding_window")
    if not extra.get("use_sliding_window") or window is None:
        return [None] * cfg.num_layers
    kinds = extra.get("layer_types")
    if kinds:
        if len(kinds) != cfg.num_layers:
            raise ValueError(f"layer_types lists {len(kinds)} layers, the model has {cfg.num_layers}")
        return [int(window) if kind == "sliding_attention" else None for kind in kinds]
    first = extra.get("max_window_layers", cfg.num_layers)
    return [int(window) if i >= first else None for i in range(cfg.num_layers)]


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        # The window differs per layer, so it is set on each layer's attention rather than through LayerOptions.
        windows = layer_windows(cfg)
        for i in range(self.model.start, self.model.stop):   # this pipeline stage's layers
            self.model.layers[i].self_attn.sliding_window = windows[i]

    @classmethod
    def layer_options(cls, cfg: ModelConfig) -> LayerOptions:
        return LayerOptions(qkv_bias=True)
