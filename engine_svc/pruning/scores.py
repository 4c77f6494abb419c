"""Pruning scores. Magnitude: |W|. Wanda (Sun et al., 2023): |W[i, j]| * ||X[:, j]||_2, the weight's magnitude
times the L2 norm over the calibration tokens of the input feature it multiplies; compared within each output row,
so a row keeps the weights that carry the most of its output on real inputs."""
from __future__ import annotations

import torch

from engine_svc.pruning.masks import keep_mask
from engine_svc.pruning.spec import SparsitySpec


def prune_scores(weight: torch.Tensor, input_norm: torch.Tensor | None) -> torch.Tensor:
    """float32 [N, K]. input_norm: [K] activation norms (Wanda), None for magnitude."""
    scores = weight.detach().float().abs()
    if input_norm is None:
        return scores
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"activation norms of shape {tuple(input_norm.shape)} for a weight with "
                         f"{weight.shape[1]} inputs")
    return scores.mul_(input_norm.to(scores.device, torch.float32))


@torch.no_grad()
def pruned(weight: torch.Tensor, spec: SparsitySpec, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of `weight` (same dtype) with the lowest-scoring weights set to +0."""
    return torch.where(keep_mask(prune_scores(weight, input_norm), spec), weight, 0)


@torch.no_grad()
def prune_in_place(weight: torch.Tensor, spec: SparsitySpec, input_norm: torch.Tensor | None = None) -> None:
    weight.copy_(pruned(weight, spec, input_norm))
