"""Content keys of full KV blocks for the prefix cache. Plain Python: no torch.

A block's key covers everything its K/V depend on: every earlier token (through the parent's key), its own tokens
and the request's extra keys (cache_salt now, a LoRA adapter later). Two requests share a block exactly when their
keys match. blake2b makes an accidental collision, which would silently hand one request another's context,
negligible (128 bits).
"""
from __future__ import annotations

import hashlib
from array import array

ROOT = b""


def block_key(parent: bytes, tokens: list[int], extra: str = "") -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    if extra:
        h.update(b"\x00salt\x00" + extra.encode())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, extra: str = "",
                        num_tokens: int | None = None) -> None:
    """Appends the keys of the full blocks among the first num_tokens (default: all) of token_ids that hashes does
    not cover yet. The extra key enters the first block only: every later key chains through it."""
    end = len(token_ids) if num_tokens is None else num_tokens
    for i in range(len(hashes), end // block_size):
        parent = hashes[i - 1] if i else ROOT
        hashes.append(block_key(parent, token_ids[i * block_size:(i + 1) * block_size], extra if i == 0 else ""))
