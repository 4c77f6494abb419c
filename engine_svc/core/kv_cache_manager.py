"""Per-request KV block tables on top of the BlockPool. Plain Python: no torch.

Invariant: a request with N tokens to hold has exactly ceil(N / block_size) blocks in its table, in order; token
position p lives in block_ids[p // block_size] at offset p % block_size.
"""
from __future__ import annotations

from engine_svc.core.block_pool import BlockPool
from engine_svc.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        needed = self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows the request's table to hold num_new_tokens more; False (and no change) if blocks are short."""
        n = self.num_new_blocks_needed(request, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            request.block_ids.extend(self.pool.allocate(n))
        return True

    def free(self, request: Request) -> None:
        # Tail blocks first, so that the least useful blocks are handed out again soonest.
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
