"""The exact patterns (N of every M along k; a fraction of each row), the sparsity spec's parsing, and Wanda's
choices against a reference written here with plain loops."""
from __future__ import annotations

import pytest
import torch

from engine_svc.pruning.masks import keep_mask, pattern_problem
from engine_svc.pruning.scores import pruned
from engine_svc.pruning.spec import SparsitySpec, parse_sparsity


def _dense(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.where(w == 0, torch.ones_like(w), w)   # no zeros before pruning: every zero after is a pruned one


@pytest.mark.parametrize("text, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_of_m_keeps_exactly_n_of_every_m_consecutive_inputs(text, n, m):
    w = _dense(48, 128)
    out = pruned(w, parse_sparsity(text))
    groups = (out != 0).reshape(48, 128 // m, m).sum(-1)
    assert bool((groups == n).all())
    kept = out != 0
    assert torch.equal(out[kept], w[kept])   # kept weights are untouched
    assert pattern_problem(out, parse_sparsity(text)) is None
    assert f"holds {m} non-zeros (at most {n})" in pattern_problem(w, parse_sparsity(text))


@pytest.mark.parametrize("fraction, cols", [(0.5, 128), (0.3, 100), (0.9, 64)])
def test_unstructured_zeroes_that_fraction_of_every_row(fraction, cols):
    spec = parse_sparsity(str(fraction))
    out = pruned(_dense(40, cols), spec)
    assert bool(((out == 0).sum(-1) == round(fraction * cols)).all())
    assert pattern_problem(out, spec) is None
    assert "a row holds 0 zeros" in pattern_problem(_dense(4, cols), spec)


def test_masks_are_decided_per_row_so_a_fused_matrix_prunes_as_its_parts():
    scores = torch.rand(3000, 64, generator=torch.Generator().manual_seed(1))   # more rows than one sort chunk
    for spec in (parse_sparsity("2:4"), parse_sparsity("0.37")):
        whole = keep_mask(scores, spec)
        parts = torch.cat([keep_mask(scores[:1000], spec), keep_mask(scores[1000:], spec)])
        assert torch.equal(whole, parts)


def test_ties_prune_the_lower_input_first():
    assert keep_mask(torch.ones(1, 8), parse_sparsity("2:4")).tolist() == [[False, False, True, True] * 2]
    assert keep_mask(torch.ones(1, 4), parse_sparsity("0.25")).tolist() == [[False, True, True, True]]


def test_the_spec_parses_n_of_m_and_fractions_and_names_bad_input():
    assert parse_sparsity("2:4") == SparsitySpec(n_keep=2, m=4) and parse_sparsity("2:4").is_two_four
    assert parse_sparsity("4:8").zero_fraction == 0.5 and not parse_sparsity("4:8").is_two_four
    assert parse_sparsity("0.5") == SparsitySpec(fraction=0.5)
    for bad, message in (("50%", "N:M"), ("4:4", "0 < N < M"), ("0", r"\(0, 1\)"), ("1.0", r"\(0, 1\)")):
        with pytest.raises(ValueError, match=message):
            parse_sparsity(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        keep_mask(torch.rand(2, 6), parse_sparsity("2:4"))


def _reference_wanda(w: list[list[float]], x: list[list[float]], m: int | None, prune: int) -> list[list[bool]]:
    """Kept positions by Wanda, with loops: metric[i][j] = |W[i][j]| * sqrt(sum over tokens of X[t][j]^2); within
    each output row (each group of m inputs of it, for N:M) the `prune` smallest metrics are pruned, equal metrics
    taking the lower index first."""
    norms = [sum(row[j] ** 2 for row in x) ** 0.5 for j in range(len(x[0]))]
    keep = []
    for row in w:
        metric = [abs(v) * norms[j] for j, v in enumerate(row)]
        width = m or len(row)
        kept_row = [True] * len(row)
        for start in range(0, len(row), width):
            group = sorted(range(start, start + width), key=lambda j: (metric[j], j))
            for j in group[:prune]:
                kept_row[j] = False
        keep.append(kept_row)
    return keep


@pytest.mark.parametrize("text, m, prune", [("2:4", 4, 2), ("4:8", 8, 4), ("0.5", None, 16)])
def test_wanda_prunes_the_smallest_weight_times_activation_norm_in_each_row_group(text, m, prune):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, 32, generator=gen)
    # Input features of very different scales: Wanda's choice then differs from magnitude's.
    x = torch.randn(50, 32, generator=gen) * torch.logspace(-2, 2, 32)[torch.randperm(32, generator=gen)]
    out = pruned(w, parse_sparsity(text), x.pow(2).sum(0).sqrt())
    assert (out != 0).tolist() == _reference_wanda(w.tolist(), x.tolist(), m, prune)
    assert not torch.equal(out != 0, pruned(w, parse_sparsity(text)) != 0)
