"""A stream of AWQ / GPTQ checkpoint tensors -> the same stream with each quantized layer's packed tensors
converted to the int4 format: `<layer>.qweight`, `<layer>.scales`, `<layer>.offsets` (the Int4Linear buffers).
Every other tensor (norms, embeddings, biases, an unquantized lm_head) passes through unchanged.

A layer's parts are held only until the last of them arrives (checkpoints store them next to each other, so
this is one layer at a time); GPTQ's g_idx is waited for when the checkpoint has one, and only checked.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from engine_svc.quant.awq import awq_to_int4
from engine_svc.quant.checkpoint_config import PackedQuantConfig
from engine_svc.quant.gptq import gptq_to_int4

_PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx")}
INT4_BUFFERS = ("qweight", "scales", "offsets")


def convert_packed_weights(weights: Iterable[tuple[str, torch.Tensor]],
                           qcfg: PackedQuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    parts = _PARTS[qcfg.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        layer, _, leaf = name.rpartition(".")
        if leaf not in parts:
            yield name, tensor
            continue
        got = pending.setdefault(layer, {})
        got[leaf] = tensor
        if len(got) == len(parts):
            yield from _convert(layer, pending.pop(layer), qcfg)
    for layer, got in pending.items():   # GPTQ checkpoints written without g_idx
        missing = [p for p in parts if p not in got and p != "g_idx"]
        if missing:
            raise ValueError(f"{qcfg.method} layer {layer!r} lacks {missing}")
        yield from _convert(layer, got, qcfg)


def _convert(layer: str, got: dict[str, torch.Tensor],
             qcfg: PackedQuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if qcfg.method == "awq":
            in_features = got["qweight"].shape[0]
            out = awq_to_int4(got["qweight"], got["qzeros"], got["scales"], qcfg.group_for(in_features))
        else:
            in_features = got["qweight"].shape[0] * 8
            out = gptq_to_int4(got["qweight"], got["qzeros"], got["scales"], qcfg.group_for(in_features),
                               g_idx=got.get("g_idx"), zero_minus_one=qcfg.zero_minus_one)
    except ValueError as e:
        raise ValueError(f"layer {layer!r}: {e}") from None
    for leaf, tensor in zip(INT4_BUFFERS, out):
        yield f"{layer}.{leaf}", tensor
