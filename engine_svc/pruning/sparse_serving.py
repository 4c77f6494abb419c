"""How the engine serves a pruned checkpoint, decided at start-up from its sparsity_config, the device, the dtype,
--quantization and --sparsity-kernels (auto | on | off): on the 2:4 kernels, or dense. Combinations that cannot
work fail here, once, with what to change, before any weight is read."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine_svc.model_config import ModelConfig
from engine_svc.pruning.masks import pattern_problem
from engine_svc.pruning.semi_sparse_linear import kernels_unavailable

_LOG = logging.getLogger("tandem.engine.sparsity")

SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class SparseServing:
    kernels: bool             # convert the 2:4 decoder linears (those whose shape measures faster sparse)
    note: str | None = None   # what the loader says about it


def plan_sparse_serving(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, quantization: str,
                        setting: str) -> SparseServing:
    if setting not in SETTINGS:
        raise ValueError(f"--sparsity-kernels must be one of {', '.join(SETTINGS)}, got {setting!r}")
    sparsity = cfg.checkpoint_sparsity
    if sparsity is None:
        if setting == "on":
            raise ValueError("--sparsity-kernels on needs a 2:4 pruned checkpoint (tandem prune --sparsity 2:4); "
                             "this one has no sparsity_config")
        return SparseServing(False)
    pattern = sparsity.spec.label() if sparsity.spec.is_n_of_m else f"{sparsity.spec.zero_fraction:g} unstructured"
    if setting == "off":
        return SparseServing(False, f"{pattern} pruned checkpoint served dense (sparse kernels off: "
                                   f"--sparsity-kernels off, or LoRA on)")
    if not sparsity.spec.is_two_four:
        if setting == "on":
            raise ValueError(f"--sparsity-kernels on: this checkpoint is {pattern} sparse; the kernels run 2:4 only")
        return SparseServing(False, f"{pattern} pruned checkpoint served dense (the sparse kernels run 2:4 only)")
    if quantization != "none":
        raise ValueError(f"a 2:4 pruned checkpoint cannot run on the sparse kernels with --quantization "
                         f"{quantization}: they multiply float16/bfloat16 weights. Pass --sparsity-kernels off to "
                         f"quantize the pruned weights and serve them dense, or drop --quantization")
    reason = kernels_unavailable(device, dtype)
    if reason is not None:
        if setting == "on":
            raise ValueError(f"--sparsity-kernels on: {reason}")
        return SparseServing(False, f"2:4 pruned checkpoint served dense: {reason}")
    return SparseServing(True)


def check_two_four(linears: list[tuple[str, nn.Linear]]) -> None:
    """Compressing a weight that is not 2:4 would silently drop weights: every one is checked first."""
    from engine_svc.pruning.spec import SparsitySpec
    spec = SparsitySpec(n_keep=2, m=4)
    for name, linear in linears:
        problem = pattern_problem(linear.weight, spec)
        if problem:
            raise ValueError(f"config.json says 2:4, but {name}.weight is not: {problem}")


@torch.no_grad()
def impose_pattern(model: nn.Module, spec) -> None:
    """Prunes every decoder linear by magnitude in place: random weights (--load-format dummy) for a config that
    says it is pruned, e.g. to benchmark a 2:4 model of a size no checkpoint is at hand for."""
    from engine_svc.pruning.calibration import decoder_linears
    from engine_svc.pruning.scores import prune_in_place
    for _, linear in decoder_linears(model):
        prune_in_place(linear.weight, spec)


def serve_sparse(model: nn.Module, serving: SparseServing, max_tokens: int) -> None:
    """Applies the plan to a loaded model: converts the 2:4 linears that measure faster, or only says why not."""
    if serving.note:
        _LOG.info(serving.note)
    if not serving.kernels:
        return
    from engine_svc.pruning.calibration import decoder_linears
    from engine_svc.pruning.kernel_choice import apply_sparse_kernels

    linears = decoder_linears(model)
    check_two_four(linears)
    apply_sparse_kernels(linears, max_tokens)
