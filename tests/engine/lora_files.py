"""PEFT LoRA adapter directories for the tiny Llamas of tiny_models.py, written directly (adapter_config.json and
adapter_model.safetensors in PEFT's tensor names, no peft package), and the independent reference: transformers on
the base weights with each adapter's update merged in (W + scaling * B @ A)."""
from __future__ import annotations

import json
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def write_lora_adapter(base_dir: Path, out_dir: Path, *, r: int, alpha: float, targets=("q_proj", "v_proj"),
                       seed: int = 0, std: float = 0.2) -> Path:
    """Random A and B (both non-zero, so the adapter changes the tokens). targets outside the seven projections
    are written into the config only: that is how an adapter the engine cannot serve looks."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    shapes = _shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            if t not in shapes:
                continue
            fan_in, fan_out = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * std
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
        "base_model_name_or_path": str(base_dir)}))
    return out_dir


def hf_merged(base_dir: Path, adapter_dir: Path | None):
    """transformers (fp32, eval) on the base weights, with the adapter's update merged into each target."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if name.endswith(".lora_A.weight"):
                prefix = name[:-len(".lora_A.weight")]
                b = tensors[prefix + ".lora_B.weight"]
                linear = modules[prefix[len("base_model.model."):]]
                linear.weight += scaling * (b @ a)
    return model
