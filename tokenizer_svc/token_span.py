"""The most bytes of input text one token can stand for, so a caller can refuse a text that can never fit a
context without tokenizing it: a text of B bytes needs at least ceil(B / max_bytes_per_token) tokens."""
from __future__ import annotations

from tokenizers import Tokenizer


def max_bytes_per_token(tokenizer: Tokenizer) -> int:
    """0 when unknown: a normalizer may map many input bytes to one short token (NFKC turns the 4-byte '𝕏' into
    'X'), and then no bound from the vocabulary holds. Otherwise each token stands for the bytes it decodes to
    (a partial UTF-8 sequence decodes to replacement characters, longer than the bytes it stands for, which only
    loosens the bound)."""
    if tokenizer.normalizer is not None:
        return 0
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return max(len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")) for i in range(size))
