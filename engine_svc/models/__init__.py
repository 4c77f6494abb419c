"""Model families, keyed by the HF `architectures` name."""
from __future__ import annotations

from torch import nn

from engine_svc.models.falcon import FalconForCausalLM
from engine_svc.models.llama import LlamaForCausalLM
from engine_svc.models.mistral import MistralForCausalLM
from engine_svc.models.qwen2 import Qwen2ForCausalLM
from engine_svc.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "FalconForCausalLM": FalconForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}") from None
