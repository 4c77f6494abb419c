"""The text of single tokens on their own, for logprob alternatives (`DetokStep.piece_token_ids`).

A piece is the text the token adds when it follows ordinary text: `decode([c, id]) - decode([c])` for a fixed
context token `c` (the token of "a"). Decoded alone, a Metaspace (sentencepiece) token like "▁world" would lose
its leading space, since the decoder strips the space of the first token; after a context it reads " world", as
in running text. Byte-level tokens read the same either way. Special tokens always show (skip_special_tokens is
off): a logprob alternative may be EOS. A token that is only part of a UTF-8 character reads as U+FFFD, as
`decode` shows it; an id outside the vocabulary reads as "".
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer


class TokenPieces:
    """Not thread-safe (its cache): one per Detokenize stream, or guarded by the caller."""

    __slots__ = ("_tokenizer", "_vocab_size", "_context", "_head", "_cache")

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = tokenizer.encode("a", add_special_tokens=False).ids
        self._context: list[int] = ids[-1:]  # [] when "a" does not encode (then pieces decode alone)
        self._head = tokenizer.decode(self._context, skip_special_tokens=False)
        self._cache: dict[int, str] = {}  # a token's piece never changes; at most one entry per vocabulary id

    def __call__(self, token_ids: Sequence[int]) -> list[str]:
        cache = self._cache
        return [cache[i] if i in cache else self._piece(i) for i in token_ids]

    def _piece(self, token_id: int) -> str:
        if not 0 <= token_id < self._vocab_size:
            return ""  # not cached: the cache stays bounded by the vocabulary
        decode = self._tokenizer.decode
        with_context = decode(self._context + [token_id], skip_special_tokens=False)
        if self._context and with_context.startswith(self._head):
            piece = with_context[len(self._head):]
        else:  # a decoder that rewrote the context: fall back to the token alone
            piece = decode([token_id], skip_special_tokens=False)
        self._cache[token_id] = piece
        return piece
