"""Reads and validates a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) against the
base model's shapes. Everything it cannot serve exactly is refused here, with a ValueError that names the cause, so
nothing about an adapter can fail later inside an engine step.

Tensors are named base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight, with A [r, in]
and B [out, r]; the update of a targeted linear is x @ A^T @ B^T * scaling, scaling = alpha / r (alpha / sqrt(r)
with use_rslora).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# PEFT module name -> (our fused module, slice index within it)
TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_TENSOR_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# Config settings that change the arithmetic beyond x @ A^T @ B^T * scaling: refused unless at their no-op value.
_MUST_BE_OFF = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias",
                "use_qalora", "use_bdlora", "trainable_token_indices", "target_parameters", "alora_invocation_tokens")


@dataclass(frozen=True)
class ModuleShapes:
    """What the base model offers: per PEFT target name, (in_features, out_features); and the layer count."""
    shapes: dict[str, tuple[int, int]]
    num_layers: int


@dataclass
class PeftAdapter:
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]                          # PEFT names, sorted
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]   # (layer, PEFT name) -> (A [r, in], B [out, r])


def read_peft_adapter(path: str | Path, shapes: ModuleShapes, max_rank: int) -> PeftAdapter:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"LoRA adapter path {str(path)!r} is not a directory")
    cfg = _read_config(path / "adapter_config.json")
    rank, alpha = _rank_and_alpha(cfg, max_rank)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    _check_declared_targets(cfg.get("target_modules"))
    weights = _read_weights(path, shapes, rank)
    targets = tuple(sorted({name for _, name in weights}))
    return PeftAdapter(rank, alpha, scaling, targets, weights)


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise ValueError(f"LoRA adapter {str(file.parent)!r} has no adapter_config.json")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in _MUST_BE_OFF:
        if cfg.get(key):
            raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
    return cfg


def _rank_and_alpha(cfg: dict, max_rank: int) -> tuple[int, float]:
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"LoRA rank {rank} exceeds max_lora_rank {max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    return rank, float(alpha)


def _check_declared_targets(declared) -> None:
    # A list names modules; a string is a regex or "all-linear", checked through the tensors actually saved.
    if isinstance(declared, list):
        bad = sorted(set(declared) - TARGETS.keys())
        if bad:
            raise ValueError(f"unsupported LoRA target modules {bad}; supported: {sorted(TARGETS)}")
    elif declared is not None and not isinstance(declared, str):
        raise ValueError(f"adapter_config.json: target_modules must be a list or a string, got {declared!r}")


def _read_weights(path: Path, shapes: ModuleShapes, rank: int) -> dict:
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        extra = " (adapter_model.bin is not read: save with safe_serialization)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"LoRA adapter {str(path)!r} has no adapter_model.safetensors{extra}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _TENSOR_NAME.match(name)
        if m is None or m.group(2) not in TARGETS:
            raise ValueError(f"unsupported LoRA tensor {name!r}: only q/k/v/o_proj and gate/up/down_proj of the "
                             f"decoder layers can be adapted")
        layer = int(m.group(1))
        if layer >= shapes.num_layers:
            raise ValueError(f"LoRA tensor {name!r} is for layer {layer}; the model has {shapes.num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = t
    if not pairs:
        raise ValueError(f"{file} holds no LoRA tensors")
    weights = {}
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {target}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes.shapes[target]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise ValueError(f"layer {layer} {target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                             f"the base model (expected {(rank, fan_in)} / {(fan_out, rank)})")
        weights[(layer, target)] = (a, b)
    return weights
