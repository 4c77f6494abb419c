"""n-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's last
n-gram (n from ngram_max down to ngram_min). Plain Python: no torch, no second model."""
from __future__ import annotations

from engine_svc.core.request import Request


def ngram_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of tokens' last n tokens, for the largest n in [n_min,
    n_max] that occurs earlier; [] when none does. A longer match is tried first: it predicts better. Among the
    occurrences of one n-gram the latest with k tokens after it wins (in a run of one repeated token the latest
    occurrence overlaps the suffix and has a single token after it); else the latest."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        first = suffix[0]
        best: list[int] = []
        for i in range(size - n - 1, -1, -1):   # earlier starts, latest first (they may overlap the suffix)
            if tokens[i] == first and tokens[i:i + n] == suffix:
                follow = tokens[i + n:i + n + k]
                if len(follow) == k:
                    return follow
                best = best or follow
        if best:
            return best
    return []


class NgramProposer:
    """The scheduler's proposer for --speculative-method ngram."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, rows: list[tuple[Request, int]]) -> list[list[int]]:
        """Up to k proposals for each (request, k); a request's token_ids are all real here (the engine resolves
        the step in flight before scheduling requests that speculate)."""
        return [ngram_lookup(req.token_ids, self.n_min, self.n_max, k) for req, k in rows]
