"""Random PEFT LoRA adapters for a tiny Llama, made with the peft package itself (B non-zero)."""
from __future__ import annotations

from pathlib import Path

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_peft_adapter(base_dir: Path, out_dir: Path, *, r: int, alpha: float, targets: list[str], seed: int,
                       use_rslora: bool = False) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=use_rslora,
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():   # peft's non-default init is small; larger weights make the adapters change the tokens
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def hf_with_adapter(base_dir: Path, adapter_dir: Path | None):
    """transformers (+ peft when adapter_dir is given) in fp32, eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, adapter_dir).eval()
