"""Builds a model on the meta device, materialises it on the target device and fills its weights from an HF
directory, a GGUF file, or random values (`dummy`); then quantizes its decoder linears when asked to."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from engine_svc.attention import AttentionBackend
from engine_svc.distributed.parallel_state import SINGLE, TensorParallel, building_for
from engine_svc.distributed.pipeline import SINGLE_STAGE, PipelineStage
from engine_svc.loader.quantized_load import build_quantized_linears, plan_quantized_load, quantized_weights
from engine_svc.model_config import ModelConfig
from engine_svc.models import model_class

_LOG = logging.getLogger("tandem.engine.loader")


def read_model_config(path: Path) -> ModelConfig:
    if path.is_dir():
        return ModelConfig.from_hf_dir(path)
    if path.suffix == ".gguf":
        from engine_svc.loader.gguf_loader import gguf_model_config
        return gguf_model_config(path)
    if path.suffix == ".json":  # a bare config.json, for dummy weights
        return ModelConfig.from_hf_dir(path.parent) if path.name == "config.json" else _json_config(path)
    raise ValueError(f"cannot load {path}: expected an HF directory, a .gguf file or a config .json")


def _json_config(path: Path) -> ModelConfig:
    import json
    return ModelConfig.from_hf_dict(json.loads(path.read_text()), name=path.stem)


def load_model(path: Path, cfg: ModelConfig, load_format: str, device: torch.device, dtype: torch.dtype,
               backend: AttentionBackend, quantization: str = "none", tp: TensorParallel = SINGLE,
               pp: PipelineStage = SINGLE_STAGE, sparsity_kernels: str = "auto",
               max_tokens: int = 2048) -> nn.Module:
    """quantization: none, or a method of engine_svc.quant.quantize_model applied once the weights are in (RTN);
    int8/int4 use the Triton kernels with the triton attention backend, as the fused layers do. AWQ / GPTQ
    checkpoints (detected) and GGUF files with int4 / int8 load into quantized linears instead (quantized_load).
    tp, pp: the tensor-parallel group and pipeline stage the model is built for; each rank reads only its part of
    the checkpoint (its stage's tensors, its shard of them). quantization GGUF_GEMV: the CPU's float32 path with
    batch-1 GEMVs over a Q4 GGUF's blocks (engine_svc.loader.gguf_gemv_serving)."""
    from engine_svc.loader.gguf_gemv_serving import GGUF_GEMV, serve_gguf_gemv
    gemv = quantization == GGUF_GEMV
    quantization = "int4" if gemv else quantization   # its decoder linears load as the exact int4 of the blocks
    cls = model_class(cfg.architecture)
    if quantization == "fp8":   # refused before minutes of loading, not after
        from engine_svc.quant.fp8_support import require_fp8_support
        require_fp8_support(device)
    from engine_svc.pruning.sparse_serving import plan_sparse_serving, serve_sparse
    sparse = plan_sparse_serving(cfg, device, dtype, quantization, sparsity_kernels)
    # An AWQ / GPTQ checkpoint, or a GGUF file asked for as int4 / int8, fills quantized linears directly.
    plan = plan_quantized_load(path, cfg, quantization, load_format)
    use_triton = backend.name == "triton"
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"), building_for(tp, pp):
            model = cls(cfg, backend)
            if plan is not None:
                build_quantized_linears(model, plan, dtype, use_triton)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty re-creates parameters; re-tie them
        model.tie_weights()
    if load_format == "dummy":
        from engine_svc.loader.dummy_loader import fill_random
        fill_random(model)
        if cfg.checkpoint_sparsity is not None:   # a random model of a pruned config holds its pattern too
            from engine_svc.pruning.sparse_serving import impose_pattern
            impose_pattern(model, cfg.checkpoint_sparsity.spec)
    else:
        lazy = tp.size > 1 or pp.size > 1   # each rank reads its part of every tensor of its stage
        weights = _weights_iter(path, lazy) if plan is None else quantized_weights(path, plan, model, lazy)
        filled = model.load_weights(_progress(weights, path))
        missing = model.expected_weights() - filled
        if missing:
            raise ValueError(f"checkpoint {path} lacks weights: {sorted(missing)[:8]}")
    model.init_buffers(device)
    model.eval()
    serve_sparse(model, sparse, max_tokens)
    if gemv:
        serve_gguf_gemv(model, path)
    elif plan is not None:
        _LOG.info(f"loaded the decoder linears as {plan.kind} (group {plan.group_size})" if plan.kind == "int4"
                  else "loaded the decoder linears as int8")
    elif quantization != "none":
        from engine_svc.quant.quantize_model import quantize_model
        replaced = quantize_model(model, quantization, use_triton=use_triton)
        _LOG.info("quantized %d linear layers to %s", len(replaced), quantization)
    _LOG.info("loaded %s (%s) in %.1fs", cfg.architecture, load_format, time.perf_counter() - t0)
    return model


def _weights_iter(path: Path, lazy: bool):
    if path.is_dir():
        from engine_svc.loader.hf_loader import iter_safetensors
        return iter_safetensors(path, lazy)
    from engine_svc.loader.gguf_loader import iter_gguf_weights
    return iter_gguf_weights(path, lazy)


def _progress(weights, path: Path):
    """Passes weights through, logging progress every quarter of the tensors (when the count is known)."""
    total = getattr(weights, "total", None)
    last = -1
    for i, item in enumerate(weights, 1):
        if total:
            pct = i * 100 // total
            if pct // 25 != last // 25:
                _LOG.info("loading %s: %d%% (%d/%d tensors)", path.name, pct, i, total)
                last = pct
        yield item
