"""The precision modes `tandem eval` and `tandem bench precision` compare: each a (dtype, weight quantization, KV-cache dtype) triple of
EngineConfig settings. Plain Python: no torch.

The pruned modes (mag24, wanda24, wanda48, mag50, wanda50) serve the model pruned by `tandem prune` with that method
and sparsity (written once into a cache directory, see benchmarks.quality_pruned), dense, in dtype "auto".

The default mode is the engine's default settings: on the CPU with a Q4_0 / Q4_1 GGUF that is float32 with the
batch-1 GEMVs over the file's blocks (engine_svc.loader.gguf_gemv_serving), which only a greedy run one sequence at
a time exercises (`tandem eval --greedy-seqs 1`).

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
    prune: tuple[str, str] | None = None   # (method, sparsity) of tandem prune: the mode serves that checkpoint

    def describe(self) -> str:
        pruned = f", pruned {self.prune[0]} {self.prune[1]}" if self.prune else ""
        return f"dtype {self.dtype}, weights {self.quantization}{pruned}, KV cache {self.kv_cache_dtype}"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", "float32", "none", "auto"),
    Mode("default", "auto", "none", "auto"),
    Mode("bf16", "bfloat16", "none", "auto"),
    Mode("fp16", "float16", "none", "auto"),
    Mode("int8", "auto", "int8", "auto"),
    Mode("int4", "auto", "int4", "auto"),
    Mode("fp8", "auto", "fp8", "auto"),
    Mode("fp8kv", "auto", "none", "fp8"),
    Mode("fp8+kv", "auto", "fp8", "fp8"),
    Mode("mag24", "auto", "none", "auto", ("magnitude", "2:4")),
    Mode("wanda24", "auto", "none", "auto", ("wanda", "2:4")),
    Mode("wanda48", "auto", "none", "auto", ("wanda", "4:8")),
    Mode("mag50", "auto", "none", "auto", ("magnitude", "0.5")),
    Mode("wanda50", "auto", "none", "auto", ("wanda", "0.5")),
)}


def mode_fields(name: str) -> dict[str, str]:
    """The EngineConfig settings of a mode."""
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
    m = MODES[name]
    if m.prune:
        raise ValueError(f"mode {name!r} serves a pruned checkpoint, not engine settings: use tandem eval")
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
