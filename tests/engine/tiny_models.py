"""Tiny random-weight Llama checkpoints written by the tests themselves (config.json + safetensors)."""
from __future__ import annotations

from pathlib import Path


def write_tiny_llama(path: Path, *, seed: int = 0, tie: bool = False, rope_scaling: dict | None = None,
                     vocab_size: int = 320, num_layers: int = 2, max_position_embeddings: int = 256) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, rope_scaling=rope_scaling,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    return save_redrawn(LlamaForCausalLM(cfg), path)


def save_redrawn(model, path: Path) -> Path:
    """Saves an HF model with its matrices redrawn from N(0, 0.15): HF's init is tiny, and larger weights make the
    logits discriminative."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_family(path, family: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A tiny random HF checkpoint of family llama, mistral, qwen2 or qwen3 (fp32), with non-zero biases and norms;
    overrides change the config (heads, head_dim, biases, window...)."""
    import torch
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family.startswith("qwen"):
        kw["use_sliding_window"] = False
    kw.update(overrides)
    model = model_cls(config_cls(**kw)).float()
    with torch.no_grad():  # HF's init is tiny; larger weights (and non-zero biases) make logits discriminative
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith(".bias"):
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.normal_(1.0, 0.15)
    save = dict(safe_serialization=True)
    if max_shard_size is not None:
        save["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save)
    return path
