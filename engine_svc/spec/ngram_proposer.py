"""n-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's last
n-gram (n from ngram_max down to ngram_min). No torch, no second model."""
from __future__ import annotations

import numpy as np

from engine_svc.core.request import Request


def ngram_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of tokens' last n tokens, for the largest n in [n_min,
    n_max] that occurs earlier; [] when none does. A longer match is tried first: it predicts better. Among the
    occurrences of one n-gram the latest with k tokens after it wins (in a run of one repeated token the latest
    occurrence overlaps the suffix and has a single token after it); else the latest. Vectorized over the context
    (numpy): a few tens of microseconds for thousands of tokens, so it can run for every row of a large batch."""
    size = len(tokens)
    if size < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # match[i]: tokens[i:i + n] equals the last n tokens, for starts i < size - n (earlier occurrences;
        # they may overlap the suffix).
        span = size - n
        match = arr[:span] == arr[span]
        for t in range(1, n):
            match &= arr[t:span + t] == arr[span + t]
        starts = np.flatnonzero(match)
        if starts.size:
            full = starts[starts + n + k <= size]
            i = int(full[-1] if full.size else starts[-1])
            return tokens[i + n:i + n + k]
    return []


class NgramProposer:
    """The scheduler's proposer for --speculative-method ngram."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        """Up to k proposals for each (request, k); a request's token_ids are all real here (the engine resolves
        the step in flight before scheduling requests that speculate)."""
        return [ngram_lookup(req.token_ids, self.n_min, self.n_max, k) for req, k in rows]
