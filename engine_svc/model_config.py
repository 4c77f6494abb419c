"""The architecture hyper-parameters the engine needs, read from an HF config.json or from GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_svc.model_name import hf_dir_served_name

if TYPE_CHECKING:
    from engine_svc.pruning.sparsity_config import CheckpointSparsity
    from engine_svc.quant.checkpoint_config import PackedQuantConfig


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def checkpoint_quantization(self) -> "PackedQuantConfig | None":
        """The AWQ / GPTQ quantization_config of an HF checkpoint (None when it has none); ValueError when the
        checkpoint's quantization is one we cannot serve."""
        from engine_svc.quant.checkpoint_config import parse_quantization_config
        return parse_quantization_config(self.extra)

    @property
    def checkpoint_sparsity(self) -> "CheckpointSparsity | None":
        """The sparsity_config `tandem prune` wrote (None when the checkpoint has none); ValueError when it cannot
        be read."""
        from engine_svc.pruning.sparsity_config import parse_sparsity_config
        return parse_sparsity_config(self.extra)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=archs[0],
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            # Falcon names these ffn_hidden_size (default 4 x hidden), num_kv_heads / multi_query and
            # layer_norm_epsilon.
            intermediate_size=cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or 4 * hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=_num_kv_heads(cfg, heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", cfg.get("layer_norm_epsilon", 1e-6)),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(cfg),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            extra=dict(cfg),   # the whole HF config: family-specific fields (biases, sliding window, Falcon's...)
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> "ModelConfig":
        cfg = json.loads((path / "config.json").read_text())
        gen = path / "generation_config.json"
        if gen.exists():
            # generation_config's eos list (e.g. Llama 3 instruct's <|eot_id|>) is what generation stops on.
            gen_eos = json.loads(gen.read_text()).get("eos_token_id")
            if gen_eos is not None:
                cfg = {**cfg, "eos_token_id": gen_eos}
        return cls.from_hf_dict(cfg, name=hf_dir_served_name(path))


def _num_kv_heads(cfg: dict[str, Any], heads: int) -> int:
    if cfg.get("model_type") == "falcon" or "FalconForCausalLM" in (cfg.get("architectures") or ()):
        # Falcon saves num_kv_heads (defaulting to the head count) but uses it only with new_decoder_architecture;
        # otherwise multi_query (default True) means one K/V head and multi_query=False plain multi-head attention.
        if cfg.get("new_decoder_architecture"):
            return cfg.get("num_kv_heads") or heads
        return 1 if cfg.get("multi_query", True) else heads
    return cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or (1 if cfg.get("multi_query") else heads)


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    return {**scaling, "rope_type": kind}
