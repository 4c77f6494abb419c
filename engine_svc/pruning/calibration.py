"""Wanda's activation norms: calibration text run through the engine itself (the same model code, weights and
paged attention that serve), layer by layer as the forward pass reaches each decoder linear.

The whole calibration is one engine step (all its windows prefilled together), so each linear's forward sees every
calibration token at once. A pre-hook on each decoder linear takes the L2 norm of each input feature over those
tokens, prunes the linear's weight in place with it, and lets the pass go on with the pruned weight: every layer's
norms are those of the inputs it will see once the layers before it are pruned (Wanda's layer-wise order), in one
pass and without holding any activations beyond the layer at hand.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine_svc.pruning.scores import prune_in_place
from engine_svc.pruning.spec import PruneConfig
from engine_svc.quant.quantize_model import DECODER_LINEARS

BLOCK = 16


def calibration_windows(source: Path, text: str, tokens: int, window: int) -> list[list[int]]:
    """The text's last `tokens` ids cut into windows of at most `window` tokens, each opened by BOS for a model that
    expects one. The end of the text is used so that `tandem eval --max-tokens N` scores a beginning the
    calibration never saw."""
    from tokenizer_svc.loading import load_tokenizer

    try:
        tok = load_tokenizer(source)
    except Exception as err:   # tokenizers raises its own exception type for a missing or broken tokenizer.json
        raise ValueError(f"{source}: no tokenizer to encode the calibration text with ({err})") from None
    prefix = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
    step = window - len(prefix)
    if step < 1:
        raise ValueError(f"--calib-window {window} leaves no room for text after the BOS token")
    ids = tok.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids
    if len(ids) < 2:
        raise ValueError("the calibration text holds fewer than 2 tokens")
    ids = ids[-tokens:]
    return [prefix + ids[i:i + step] for i in range(0, len(ids), step)]


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in DECODER_LINEARS]


class _LayerwisePruner:
    """The pre-hooks: each decoder linear, reached once with all calibration tokens, records its input norms and
    is pruned in place before it runs."""

    def __init__(self, config: PruneConfig, expected_tokens: int, on_linear: Callable[[str], None]) -> None:
        self.config, self.expected_tokens, self.on_linear = config, expected_tokens, on_linear
        self.norms: dict[str, torch.Tensor] = {}
        self.error: str | None = None

    def hook(self, name: str):
        def pre_hook(module: nn.Linear, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            if name in self.norms:
                self.error = self.error or f"{name} ran twice: the calibration took more than one engine step"
                raise RuntimeError(self.error)
            if x.shape[0] != self.expected_tokens:
                self.error = (f"{name} saw {x.shape[0]} tokens in one pass, expected all {self.expected_tokens} "
                              f"calibration tokens")
                raise RuntimeError(self.error)
            norm = x.float().pow(2).sum(0).sqrt_()
            prune_in_place(module.weight, self.config.sparsity, norm)
            self.norms[name] = norm.cpu()
            self.on_linear(name)
        return pre_hook


def calibration_dtype(checkpoint_dtype: str | None, device: str) -> str:
    """The engine dtype that holds the checkpoint's values exactly, so the masks the engine applies during the
    calibration are the ones the writer computes from the checkpoint with the same norms: a CUDA engine keeps a
    float16 / bfloat16 checkpoint's own dtype (half the memory of float32); otherwise float32."""
    from engine_svc.worker.device_choice import resolve_device
    if checkpoint_dtype in ("float16", "bfloat16") and resolve_device(device).type == "cuda":
        return checkpoint_dtype
    return "float32"


def calibrated_norms(config: PruneConfig, on_linear: Callable[[str], None] = lambda name: None
                     ) -> dict[str, torch.Tensor]:
    """{engine module name (fused: ...qkv_proj, ...gate_up_proj): float32 [in_features] input norm}, each taken
    from the calibration text flowing through the already-pruned layers before it."""
    from engine_svc.config import EngineConfig
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine
    from engine_svc.loader import read_model_config

    cfg = read_model_config(config.source)
    window = min(config.calib_window, cfg.max_position_embeddings - 1)
    windows = calibration_windows(config.source, config.calib_text.read_text(encoding="utf-8"),
                                  config.calib_tokens, window)
    total = sum(len(w) for w in windows)
    engine = Engine(EngineConfig(
        model=str(config.source), device=config.device, dtype=calibration_dtype(cfg.torch_dtype, config.device),
        enable_prefix_caching=False, enforce_eager=True, async_scheduling=False, max_num_batched_tokens=total,
        max_num_seqs=len(windows), num_kv_blocks=sum(-(-(len(w) + 1) // BLOCK) for w in windows),
        block_size=BLOCK))
    pruner = _LayerwisePruner(config, total, on_linear)
    linears = decoder_linears(engine.runner.model)
    handles = [module.register_forward_pre_hook(pruner.hook(name)) for name, module in linears]
    try:
        for i, w in enumerate(windows):
            engine.add_request(f"calib-{i}", w, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while engine.has_work():
            engine.step()
    finally:
        for h in handles:
            h.remove()
        engine.shutdown()
        del engine
        gc.collect()
    missing = [name for name, _ in linears if name not in pruner.norms]
    if pruner.error or missing:
        raise RuntimeError(f"calibration failed: {pruner.error or f'{len(missing)} linears never ran'}")
    return pruner.norms
