"""The named precision modes that `tandem bench precision` and `tandem eval` compare: each is a set of
EngineConfig fields (weights' activation dtype, weight quantization, KV cache dtype)."""
from __future__ import annotations

MODES: dict[str, dict[str, str]] = {
    "fp32": {"dtype": "float32", "quantization": "none", "kv_cache_dtype": "auto"},
    "bf16": {"dtype": "bfloat16", "quantization": "none", "kv_cache_dtype": "auto"},
    "fp16": {"dtype": "float16", "quantization": "none", "kv_cache_dtype": "auto"},
    # Quantized weights keep the device's default activation dtype: bf16 on CUDA, fp32 on the CPU.
    "int8": {"dtype": "auto", "quantization": "int8", "kv_cache_dtype": "auto"},
    "int4": {"dtype": "auto", "quantization": "int4", "kv_cache_dtype": "auto"},
    "fp8": {"dtype": "auto", "quantization": "fp8", "kv_cache_dtype": "auto"},
    "fp8kv": {"dtype": "auto", "quantization": "fp8", "kv_cache_dtype": "fp8"},
    "bf16kv8": {"dtype": "bfloat16", "quantization": "none", "kv_cache_dtype": "fp8"},
}


def mode_fields(name: str) -> dict[str, str]:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; modes: {', '.join(MODES)}") from None
