"""Content keys of full KV blocks for the prefix cache. Plain Python: no torch.

A block's key covers everything its K/V depend on: every earlier token (through the parent's key), its own tokens
and the request's extra keys: its cache_salt and its LoRA adapter (an adapter changes the K/V projections, so its
blocks are never shared with the base model or another adapter). Two requests share a block exactly when their
keys match. Each extra key enters as a tag and a length-prefixed value, so no salt can pose as an adapter. blake2b makes an accidental collision, which would silently hand one request another's context,
negligible (128 bits).
"""
from __future__ import annotations

import hashlib
from array import array

ROOT = b""


def block_key(parent: bytes, tokens: list[int], extra: str = "", adapter: str | None = None) -> bytes:
    """extra is the cache salt; adapter the LoRA adapter's name (None: the base model)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    if extra:
        h.update(_tagged(b"salt", extra))
    if adapter is not None:
        h.update(_tagged(b"adapter", adapter))
    return h.digest()


def _tagged(tag: bytes, value: str) -> bytes:
    data = value.encode()
    return b"\x00" + tag + b"\x00" + len(data).to_bytes(4, "little") + data


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, extra: str = "",
                        num_tokens: int | None = None, adapter: str | None = None) -> None:
    """Appends the keys of the full blocks among the first num_tokens (default: all) of token_ids that hashes does
    not cover yet. The extra keys (salt, adapter) enter the first block only: every later key chains through it."""
    end = len(token_ids) if num_tokens is None else num_tokens
    for i in range(len(hashes), end // block_size):
        parent = hashes[i - 1] if i else ROOT
        tokens = token_ids[i * block_size:(i + 1) * block_size]
        hashes.append(block_key(parent, tokens, extra, adapter) if i == 0 else block_key(parent, tokens))
