"""Which weights a score matrix keeps under a sparsity spec, and the check that a weight has a pattern.

Every decision is local to one output row (and, for N:M, to one group of M consecutive input features of it), so
the mask of a fused matrix (q, k and v stacked by rows) equals the stacked masks of its parts. Ties are broken by
position, the lower input index pruned first (a stable sort), for the same reason: the result never depends on
the shape the rows came in.
"""
from __future__ import annotations

import torch

from engine_svc.pruning.spec import SparsitySpec

ROW_CHUNK = 1024   # rows scored at once: the sort's int64 indices are 8 bytes per weight of the chunk only


def keep_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """bool [N, K]: True where the weight is kept. N:M prunes the M - N lowest scores of each group of M inputs
    along k; unstructured prunes round(fraction * K) lowest scores of each row."""
    if scores.dim() != 2:
        raise ValueError(f"expected a 2-D score matrix, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if spec.is_n_of_m and cols % spec.m:
        raise ValueError(f"{spec.label()} sparsity needs the input dimension to be a multiple of {spec.m}, got {cols}")
    mask = torch.empty(rows, cols, dtype=torch.bool, device=scores.device)
    for start in range(0, rows, ROW_CHUNK):
        part = scores[start:start + ROW_CHUNK]
        mask[start:start + ROW_CHUNK] = _n_of_m_mask(part, spec) if spec.is_n_of_m else _row_mask(part, spec)
    return mask


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of the `count` lowest entries along the last dimension (ties: lower index first)."""
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :count]
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    return pruned.scatter_(-1, order, True)


def _n_of_m_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // spec.m, spec.m)
    return ~_lowest(groups, spec.m - spec.n_keep).reshape(rows, cols)


def _row_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    return ~_lowest(scores, spec.pruned_per_row(scores.shape[1]))


def pattern_problem(weight: torch.Tensor, spec: SparsitySpec) -> str | None:
    """Why `weight` [N, K] does not have the pattern (None when it does): N:M, more than N non-zeros in some group
    of M along k; unstructured, fewer zeros than round(fraction * K) in some row."""
    rows, cols = weight.shape
    if spec.is_n_of_m:
        if cols % spec.m:
            return f"input dimension {cols} is not a multiple of {spec.m}"
        nonzero = (weight.reshape(rows, cols // spec.m, spec.m) != 0).sum(-1)
        worst = int(nonzero.max()) if nonzero.numel() else 0
        return None if worst <= spec.n_keep else f"a group of {spec.m} holds {worst} non-zeros (at most {spec.n_keep})"
    zeros = (weight == 0).sum(-1)
    least, need = (int(zeros.min()) if zeros.numel() else 0), spec.pruned_per_row(cols)
    return None if least >= need else f"a row holds {least} zeros (at least {need})"
