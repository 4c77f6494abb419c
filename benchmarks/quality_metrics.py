"""The arithmetic of `tandem eval`: windows over the text, perplexity, greedy agreement. Plain Python: no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass


def split_windows(ids: list[int], context: int, prefix: list[int] | tuple[int, ...] = ()) -> list[list[int]]:
    """Cuts the text's ids into consecutive, non-overlapping windows of at most `context` tokens, each starting
    with `prefix` (the BOS token for models that expect one). Every window scores all of its tokens after the
    first, so a text token is predicted unless it opens a window without a prefix. A last window too short to
    predict anything is dropped."""
    step = context - len(prefix)
    if step < 1:
        raise ValueError(f"context {context} leaves no room for text after a {len(prefix)}-token prefix")
    windows = [list(prefix) + ids[i:i + step] for i in range(0, len(ids), step)]
    return [w for w in windows if len(w) >= 2]


def perplexity(nll_sum: float, count: int) -> float:
    """exp of the mean negative log-likelihood over `count` predicted tokens."""
    if count < 1:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(nll_sum / count)


def delta_percent(value: float, reference: float) -> float:
    return (value / reference - 1.0) * 100.0


@dataclass(frozen=True)
class Agreement:
    matched_positions: int     # summed over sequences: leading tokens equal to the reference's
    total_positions: int       # summed over sequences: the reference's length
    identical_sequences: int
    sequences: int

    @property
    def positions_percent(self) -> float:
        return 100.0 * self.matched_positions / self.total_positions

    @property
    def identical_percent(self) -> float:
        return 100.0 * self.identical_sequences / self.sequences


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> Agreement:
    """Positions count only up to each sequence's first divergence: after it, the two condition on different
    text and any later match is chance."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need the same, non-zero number of sequences; got {len(reference)} and {len(candidate)}")
    matched = [common_prefix_len(r, c) for r, c in zip(reference, candidate)]
    identical = sum(1 for r, c in zip(reference, candidate) if r == c)
    return Agreement(sum(matched), sum(len(r) for r in reference), identical, len(reference))
