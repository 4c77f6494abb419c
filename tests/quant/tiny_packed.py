"""Tiny AWQ / GPTQ checkpoint directories written by the tests: a random tiny Llama (tests.engine.tiny_models)
whose projection weights are quantized round-to-nearest with zero points and packed by the independent packers
of packing_spec; next to it, the same model with those weights dequantized ((q - zero) * scale), the reference."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests.engine.tiny_models import write_tiny_llama
from tests.quant.packing_spec import awq_pack_along_columns, gptq_pack_columns, gptq_pack_rows

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rtn(w: np.ndarray, group: int):
    """[N, K] -> q [N, K] in 0..15, zero [N, K/G] in 1..15, fp16-representable scale [N, K/G], dequantized [N, K]."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.min(-1), g.max(-1)
    scale = np.maximum((hi - lo) / 14.0, 1e-4).astype(np.float16).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 1, 15)    # v1 GPTQ cannot store a zero of 0
    q = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, 15)
    deq = ((q - zero[..., None]) * scale[..., None]).astype(np.float32).reshape(n, k)
    return q.reshape(n, k).astype(np.int64), zero.astype(np.int64), scale, deq


def write_packed_pair(root: Path, method: str, group: int = 32, seed: int = 0,
                      write_plain: Callable[[Path], Path] | None = None) -> tuple[Path, Path]:
    """-> (quantized checkpoint dir, dequantized reference dir). write_plain(path) writes the float checkpoint to
    quantize (default: a tiny Llama)."""
    plain = (write_plain or (lambda p: write_tiny_llama(p, seed=seed)))(root / "plain")
    tensors = load_file(plain / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        layer, _, leaf = name.rpartition(".")
        if leaf != "weight" or layer.rpartition(".")[2] not in PROJECTIONS:
            packed[name] = reference[name] = t
            continue
        q, zero, scale, deq = _rtn(t.numpy().astype(np.float32), group)
        reference[name] = torch.from_numpy(deq)
        packed[f"{layer}.scales"] = torch.from_numpy(scale.T.astype(np.float16)).contiguous()
        if method == "awq":
            packed[f"{layer}.qweight"] = awq_pack_along_columns(q.T)
            packed[f"{layer}.qzeros"] = awq_pack_along_columns(zero.T)
        else:
            packed[f"{layer}.qweight"] = gptq_pack_rows(q.T)
            packed[f"{layer}.qzeros"] = gptq_pack_columns(zero.T - 1)
            packed[f"{layer}.g_idx"] = torch.arange(q.shape[1], dtype=torch.int32) // group
    config = json.loads((plain / "config.json").read_text())
    qcfg = ({"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
            if method == "awq" else
            {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": False, "desc_act": False})
    out = {}
    for kind, weights, extra in (("quantized", packed, {"quantization_config": qcfg}), ("reference", reference, {})):
        d = root / f"{method}-{kind}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        out[kind] = d
    return out["quantized"], out["reference"]
