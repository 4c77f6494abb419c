"""The precision modes `tandem eval` and `tandem bench precision` compare: each a (dtype, weight quantization, KV-cache dtype) triple of
EngineConfig settings. Plain Python: no torch.

The quantized modes keep dtype "auto" (bfloat16 on CUDA, float32 on the CPU), the same activation dtype as the
default reference of that device, so their delta against it measures the quantization alone.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: str               # EngineConfig.dtype
    quantization: str        # EngineConfig.quantization
    kv_cache_dtype: str      # EngineConfig.kv_cache_dtype

    def describe(self) -> str:
        return f"dtype {self.dtype}, weights {self.quantization}, KV cache {self.kv_cache_dtype}"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", "float32", "none", "auto"),
    Mode("bf16", "bfloat16", "none", "auto"),
    Mode("fp16", "float16", "none", "auto"),
    Mode("int8", "auto", "int8", "auto"),
    Mode("int4", "auto", "int4", "auto"),
    Mode("fp8", "auto", "fp8", "auto"),
    Mode("fp8kv", "auto", "none", "fp8"),
    Mode("fp8+kv", "auto", "fp8", "fp8"),
)}


def mode_fields(name: str) -> dict[str, str]:
    """The EngineConfig settings of a mode."""
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
    m = MODES[name]
    return {"dtype": m.dtype, "quantization": m.quantization, "kv_cache_dtype": m.kv_cache_dtype}


def default_reference(device_type: str) -> str:
    """The unquantized mode each device serves by default: bf16 on CUDA, fp32 on the CPU."""
    return "bf16" if device_type == "cuda" else "fp32"


def modes_to_run(names: list[str], reference: str) -> list[Mode]:
    """The asked modes in order, without repeats, the reference first (every delta is taken against it)."""
    unknown = [n for n in [*names, reference] if n not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    ordered = [reference] + [n for n in names if n != reference]
    return [MODES[n] for n in dict.fromkeys(ordered)]
