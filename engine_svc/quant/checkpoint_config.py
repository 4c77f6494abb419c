"""The `quantization_config` of an HF config.json for AWQ and GPTQ checkpoints, parsed and checked against what
the converters (engine_svc.quant.awq, engine_svc.quant.gptq) serve.

Fields read (as AutoAWQ / AutoGPTQ / transformers write them):
- quant_method: "awq" or "gptq" (anything else, e.g. "bitsandbytes", is refused).
- bits (AWQ also calls it w_bit): only 4.
- group_size (AWQ also q_group_size): a positive group along the input dimension, or -1 for one group per row.
- AWQ: version "gemm" (the layout awq.py reads); "gemv", "gemv_fast", "marlin", "exllama" are other layouts.
  zero_point False is refused (no AWQ GEMM checkpoint without zero points is written by AutoAWQ), and so is
  modules_to_not_convert naming anything but lm_head (all decoder linears are loaded as int4).
- GPTQ: sym, desc_act, static_groups, checkpoint_format ("gptq" = v1 with zero - 1 stored, "gptq_v2" = zero as is).
  desc_act (act order) is refused unless static_groups makes g_idx the trivial k // group_size; the loader
  still checks every layer's g_idx.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PACKED_METHODS = ("awq", "gptq")


@dataclass(frozen=True)
class PackedQuantConfig:
    method: str                 # "awq" | "gptq"
    bits: int
    group_size: int             # -1: one group spans the whole input dimension of each layer
    sym: bool = False
    desc_act: bool = False
    zero_minus_one: bool = False    # GPTQ v1 checkpoints store zero - 1

    def group_for(self, in_features: int) -> int:
        """The group size of a layer with this many inputs; refuses one that does not divide it."""
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(f"{self.method} group size {g} does not divide the input dimension {in_features}")
        return g


def parse_quantization_config(hf_config: dict[str, Any]) -> PackedQuantConfig | None:
    """None when the checkpoint is not quantized; ValueError for a quantized one we cannot serve."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method not in PACKED_METHODS:
        raise ValueError(f"unsupported checkpoint quantization {method!r}; supported: {list(PACKED_METHODS)}")
    bits = int(q.get("bits", q.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method} checkpoints with {bits} bits are not supported; only 4-bit")
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    if group != -1 and group <= 0:
        raise ValueError(f"{method} group_size must be positive or -1, got {group}")
    if group > 0 and group % 2:
        raise ValueError(f"{method} group_size {group} is odd; the int4 format packs pairs along the input")
    if method == "awq":
        return _awq(q, bits, group)
    return _gptq(q, bits, group)


def _awq(q: dict[str, Any], bits: int, group: int) -> PackedQuantConfig:
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; only 'gemm'")
    if not q.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points are not supported")
    kept_float = [m for m in q.get("modules_to_not_convert") or () if m != "lm_head"]
    if kept_float:   # every decoder linear is built as int4; a float one among them would have nowhere to go
        raise ValueError(f"AWQ checkpoints with unquantized decoder modules {kept_float} are not supported")
    return PackedQuantConfig("awq", bits, group)


def _gptq(q: dict[str, Any], bits: int, group: int) -> PackedQuantConfig:
    desc_act = bool(q.get("desc_act", False))
    if desc_act and not q.get("static_groups", False):
        raise ValueError("GPTQ checkpoints with desc_act (act order) are not supported: their g_idx regroups the "
                         "input dimension; re-quantize with desc_act=False or static_groups=True")
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; only 'gptq' (v1) and 'gptq_v2'")
    return PackedQuantConfig("gptq", bits, group, sym=bool(q.get("sym", True)), desc_act=desc_act,
                             zero_minus_one=fmt == "gptq")
