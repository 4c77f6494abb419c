"""The CPU's default serving of a GGUF whose decoder linears are all Q4_0 / Q4_1 (the default model is Q4_1):
float32 arithmetic throughout (the q4 GEMV on AVX-512 VNNI: integer dot products over x kept to about 23 bits of
each block's largest |x|), and every linear with a block type the GEMV reads (decoder linears, and lm_head when it
is Q8_0 / Q4_0 / Q4_1) also keeps the file's blocks, so a batch-1 decode step reads 5 to 8.5 bits per weight
instead of 32 (engine_svc.quant.gemv_linear).

It applies to `--dtype auto` (the default) on the CPU, one rank, no LoRA and no weight offload; `--dtype float32`
keeps the plain float32 path (F.linear only), whose outputs the equality tests against transformers pin. Both
multiply the same float32 weights: the decoder linears are loaded through the GGUF int4 path (Q4 blocks map onto
it exactly) and widened once from it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_svc.config import EngineConfig
from engine_svc.loader.gguf_loader import hf_name, open_gguf
from engine_svc.models.row_decode import RowDecodeModel, row_decode_supported
from engine_svc import cpu_kernels
from engine_svc.quant.gemv_linear import GemvLinear
from engine_svc.quant.gguf_gemv import GemvBlocks, q4_blocks, q8_0_blocks
from engine_svc.quant.gguf_quant import INT4_GGUF_TYPES, INT8_GGUF_TYPES, q4_to_int4
from engine_svc.quant.int4_linear import Int4Linear

_LOG = logging.getLogger("tandem.engine.loader")

GGUF_GEMV = "gguf-gemv"   # the weights plan load_model takes for this path (not a --quantization choice)


def gguf_gemv_applies(config: EngineConfig, path: Path, device: torch.device, ranks: int) -> bool:
    return (device.type == "cpu" and config.dtype == "auto" and config.quantization == "none"
            and config.load_format != "dummy" and path.suffix == ".gguf" and ranks == 1
            and not config.enable_lora and not config.cpu_offload_gb and _decoder_linears_are_q4(path))


def weights_plan(config: EngineConfig, path: Path, device: torch.device, ranks: int) -> str:
    """What load_model is asked for: this path where it applies, else the configured quantization."""
    return GGUF_GEMV if gguf_gemv_applies(config, path, device, ranks) else config.quantization


def _decoder_linears_are_q4(path: Path) -> bool:
    """Every 2-D tensor of a decoder layer (its linears' weights) is Q4_0 / Q4_1: only those load exactly as int4."""
    linears = [t for t in open_gguf(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return bool(linears) and all(t.tensor_type in INT4_GGUF_TYPES for t in linears)


def serve_gguf_gemv(model: nn.Module, path: Path) -> None:
    """Swaps the loaded int4 decoder linears and lm_head for GemvLinear modules and compiles their GEMVs. Without
    a working C++ compiler the modules stay on F.linear, and the reason is printed."""
    t0 = time.perf_counter()
    layers = [name for name, m in model.named_modules() if isinstance(m, Int4Linear)]
    for name in layers:
        parent, _, attr = name.rpartition(".")
        int4: Int4Linear = model.get_submodule(name)
        blocks = q4_blocks(int4.qweight, int4.scales, int4.offsets)
        setattr(model.get_submodule(parent), attr, GemvLinear(int4.dequantized_weight(torch.float32), int4.bias,
                                                              blocks))
    head = _lm_head_blocks(path)
    if head is not None and getattr(model, "lm_head", None) is not None:
        model.lm_head = GemvLinear(model.lm_head.weight, model.lm_head.bias, head)
    gemvs = [m for m in model.modules() if isinstance(m, GemvLinear)]
    rows = [m for m in model.modules() if getattr(m, "row_decode", False) is None and row_decode_supported(m)]
    try:
        for m in gemvs:
            m.compile()
        for m in rows:
            m.row_decode = RowDecodeModel(m)
    except Exception as err:   # noqa: BLE001  (inductor's failures have no common type: a missing compiler, ...)
        for m in gemvs:
            m.kernel = None
        for m in rows:
            m.row_decode = None
        _LOG.warning(f"batch-1 GEMV kernels unavailable ({type(err).__name__}: {str(err)[:200]}); serving "
                     "float32 F.linear only")
        return
    parts = [f"{len(layers)} decoder linears", *([f"lm_head ({head.kind})"] if head is not None else []),
             *(["single-token steps in compiled calls"] if rows else []), f"GEMVs: {cpu_kernels.describe_gemv()}"]
    _LOG.info(f"float32 with batch-1 GEMVs over the GGUF's blocks: {', '.join(parts)}; compiled in "
              f"{time.perf_counter() - t0:.1f}s")


def _lm_head_blocks(path: Path) -> GemvBlocks | None:
    """lm_head's blocks: the GGUF's output tensor, or the token embedding it is tied to."""
    tensors = {hf_name(t.name): t for t in open_gguf(path).tensors}
    t = tensors.get("lm_head.weight") or tensors.get("model.embed_tokens.weight")
    if t is None:
        return None
    raw = np.asarray(t.data)
    if t.tensor_type in INT8_GGUF_TYPES:
        return q8_0_blocks(raw)
    if t.tensor_type in INT4_GGUF_TYPES:
        return q4_blocks(*q4_to_int4(raw, t.tensor_type))
    return None
