"""Per-request KV block tables on top of the BlockPool, with automatic prefix caching. Plain Python: no torch.

Invariants:
- a request with N tokens to hold has exactly ceil(N / block_size) blocks in its table, in order; token position
  p lives in block_ids[p // block_size] at offset p % block_size;
- a request's leading blocks may be shared (prefix-cache hits); nothing ever writes into a shared or cached block,
  because hits cover only full blocks and always leave at least the last prompt token to compute, and a request
  writes only at positions >= its num_computed_tokens.

With a host tier (num_host_blocks > 0, prefix caching on), the blocks the pool evicts are offloaded there and a
lookup continues there after the device pool's chain ends (engine_svc.core.host_kv_tier). A block found there gets
a fresh device block, a load copy planned for the step that adopts it, and is indexed in the device pool at once:
the step's copies run before its forward, so every reader of that block in the step, or later, sees its K/V.
take_copies() hands the copies planned since the last call to the step being scheduled.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine_svc.core.block_hash import extend_block_hashes
from engine_svc.core.block_pool import BlockPool
from engine_svc.core.host_kv_tier import HostTier, KVCopies
from engine_svc.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queries: int = 0    # prompt tokens looked up (once per request, when it is first scheduled)
    hits: int = 0       # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        """num_host_blocks: slots of the host tier (0: none; it needs prefix caching, whose keys it uses)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_stats = PrefixCacheStats()
        self.host: HostTier | None = None
        self._offloads: dict[int, int] = {}   # host slot -> device block; the last offload to a slot wins
        self._loads: list[tuple[int, int]] = []
        if num_host_blocks > 0 and enable_prefix_caching:
            self.host = HostTier(num_host_blocks)
            self.pool.on_evict = self._offload

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free or evictable cached)."""
        return self.pool.num_available

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------------------------

    def _hashes(self, request: Request) -> list[bytes]:
        # A trailing placeholder (asynchronous scheduling) is no token yet: its block is not hashed until it is.
        extend_block_hashes(request.block_hashes, request.token_ids, self.block_size, request.cache_salt,
                            request.num_tokens - request.has_placeholder, adapter=request.adapter)
        return request.block_hashes

    def find_cached_blocks(self, request: Request) -> list[int]:
        """The longest chain of cached full blocks that starts the request's tokens, leaving at least one token to
        compute (its logits pick the next token). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        limit = (request.num_tokens - 1) // self.block_size
        blocks = []
        for key in self._hashes(request)[:limit]:
            b = self.pool.lookup(key)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def find_prefix(self, request: Request, donor: Request | None) -> tuple[list[int], list[bytes]]:
        """What a request that holds no blocks starts with: donor's full computed blocks of the prompt they share
        (a running member of its group), else its longest cached prefix; then the keys of the blocks after those
        that the host tier holds. At least one token is left to compute. Takes no references."""
        bs = self.block_size
        k = 0 if donor is None else min((request.num_tokens - 1) // bs, request.num_prompt_tokens // bs,
                                        donor.num_computed_tokens // bs, len(donor.block_ids))
        blocks = donor.block_ids[:k] if k > 0 else self.find_cached_blocks(request)
        return blocks, self.find_host_blocks(request, len(blocks))

    def find_host_blocks(self, request: Request, num_device_hits: int) -> list[bytes]:
        """Keys of the full blocks right after the device pool's num_device_hits that the host tier holds, in
        chain order (the same limit: at least one token left to compute)."""
        if self.host is None:
            return []
        limit = (request.num_tokens - 1) // self.block_size
        keys = []
        for key in self._hashes(request)[num_device_hits:limit]:
            if self.host.slot(key) is None:
                break
            keys.append(key)
        return keys

    def _offload(self, block_id: int, key: bytes) -> None:
        slot = self.host.store(key)
        if slot is not None:
            self._offloads[slot] = block_id

    def take_copies(self) -> KVCopies:
        """The copies planned since the last call, for the step being scheduled to run before its forward."""
        copies = KVCopies([(b, s) for s, b in self._offloads.items()], self._loads)
        self._offloads, self._loads = {}, []
        return copies

    def release_copies(self, copies: KVCopies) -> None:
        """The step that ran copies has had its results applied: the host slots it read may be reused."""
        if self.host is not None:
            self.host.release([s for s, _ in copies.loads])

    def abandon_copies(self, copies: list[KVCopies]) -> None:
        """Every step in flight was dropped (a failure) and copies may not have run: what they were to carry is
        forgotten in both tiers (those slots and blocks may hold anything), and no host slot stays pinned."""
        if self.host is None:
            return
        for c in copies:
            for s, b in c.loads:
                key = self.host.key_in(s)
                if key is not None:
                    self.pool.uncache(b, key)
        for c in copies:
            for _, s in c.offloads:
                self.host.discard(s)
        self.host.release_all()

    def cache_full_blocks(self, request: Request) -> None:
        """Indexes the request's blocks whose every token now has K/V in the cache."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        if full <= request.num_indexed_blocks:
            return
        hashes = self._hashes(request)
        for i in range(request.num_indexed_blocks, full):
            self.pool.cache(request.block_ids[i], hashes[i])
        request.num_indexed_blocks = full

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        self.prefix_stats.queries += num_prompt_tokens
        self.prefix_stats.hits += num_hit_tokens

    # --- slots ----------------------------------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = (),
                       host_keys: list[bytes] = ()) -> bool:
        """Grows the request's table to hold num_new_tokens beyond its computed ones, first adopting cached_blocks
        and then the host tier's blocks of host_keys (only for a request that holds no blocks yet; both count as
        computed). False, and no change, when the pool is short."""
        if (cached_blocks or host_keys) and request.block_ids:
            raise ValueError("cached blocks can only start an empty block table")
        adopted = len(cached_blocks) + len(host_keys)
        have = len(request.block_ids) + adopted
        computed = request.num_computed_tokens + adopted * self.block_size
        new = max(0, self.blocks_for_tokens(computed + num_new_tokens) - have)
        revived = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        if new + revived + len(host_keys) > self.pool.num_available:
            return False
        if cached_blocks:
            self.pool.share(list(cached_blocks))
            request.block_ids.extend(cached_blocks)
        if host_keys:
            # Pinned before allocating: the offloads of the blocks this allocation evicts cannot take these slots.
            slots = [self.host.take_for_load(k) for k in host_keys]
            blocks = self.pool.allocate(len(host_keys))
            for key, slot, b in zip(host_keys, slots, blocks):
                self._loads.append((slot, b))
                self.pool.cache(b, key)
            request.block_ids.extend(blocks)
        if adopted:
            request.num_indexed_blocks = adopted
        if new:
            request.block_ids.extend(self.pool.allocate(new))
        return True

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Frees the request's blocks past the first num_tokens positions (speculative decoding: blocks that held
        only rejected proposals). They are private to it and never cached: nothing is indexed before its tokens
        are accepted ones."""
        keep = self.blocks_for_tokens(num_tokens)
        if len(request.block_ids) > keep:
            self.pool.free(list(reversed(request.block_ids[keep:])))
            del request.block_ids[keep:]

    def share_prefix(self, source: Request, target: Request, num_blocks: int) -> None:
        """target (holding no blocks) takes source's first num_blocks blocks by reference, as computed."""
        if target.block_ids:
            raise ValueError("a shared prefix can only start an empty block table")
        blocks = source.block_ids[:num_blocks]
        self.pool.share(blocks)
        target.block_ids = list(blocks)
        target.num_computed_tokens = len(blocks) * self.block_size
        target.num_indexed_blocks = min(source.num_indexed_blocks, len(blocks))

    def free(self, request: Request) -> None:
        # Tail blocks first: they go to the free queue first and so are evicted first; a shared prefix outlives
        # the suffixes that hang off it.
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        request.num_indexed_blocks = 0

    def check_integrity(self, live: list[Request]) -> list[str]:
        """Every broken invariant between the pool and the live requests' tables; empty when consistent. With no
        live requests this means: no block in use, and free + cached-idle == total."""
        problems = self.pool.check()
        refs = [0] * self.num_blocks
        for r in live:
            for b in r.block_ids:
                refs[b] += 1
        for b, n in enumerate(refs):
            if self.pool.ref_count(b) != n:
                problems.append(f"block {b}: ref count {self.pool.ref_count(b)}, live tables hold {n}")
        if not live and self.pool.num_free + self.pool.num_cached_idle != self.num_blocks:
            problems.append(f"idle, but free {self.pool.num_free} + cached {self.pool.num_cached_idle} "
                            f"!= total {self.num_blocks}")
        if self.host is not None:
            problems += self.host.check()
            if not live and not self._loads and self.host.num_pinned:
                problems.append(f"idle, but {self.host.num_pinned} host slots are still pinned")
        return problems
