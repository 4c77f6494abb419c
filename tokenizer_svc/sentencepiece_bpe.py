"""A sentencepiece-style BPE tokenizer (GGUF tokenizer.ggml.model == "llama") rebuilt as a `tokenizers` BPE.

The GGUF stores the vocabulary with a score per piece and no merges. Sentencepiece BPE merges the adjacent pair
whose joined piece has the highest score, so the merge list is every split of a piece into two vocabulary
pieces, ranked by the joined piece's score (best first). Byte-fallback pieces (<0xNN>) cover any character the
vocabulary lacks, and "▁" stands for a space.
"""
from __future__ import annotations

from typing import Sequence

from gguf import TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPACE = "\u2581"


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                       token_types: Sequence[int]) -> list[tuple[str, str]]:
    normal = {tok: i for i, tok in enumerate(tokens) if token_types[i] == TokenType.NORMAL}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for tok, index in normal.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in normal and right in normal:
                # Ties: a longer left piece first, then the order of the vocabulary (as transformers does).
                ranked.append((-scores[index], -len(left), -len(right), index, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float] | None, token_types: Sequence[int],
                            unknown_token_id: int | None, add_space_prefix: bool) -> Tokenizer:
    if scores is None or len(scores) != len(tokens):
        raise ValueError("a sentencepiece (llama) GGUF vocabulary needs one tokenizer.ggml.scores entry per token")
    unk = tokens[unknown_token_id] if isinstance(unknown_token_id, int) and 0 <= unknown_token_id < len(tokens) \
        else None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges_from_scores(tokens, scores, token_types), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    # "first": only the start of the text gets the prefix "▁", not every piece between added tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE,
                                                       prepend_scheme="first" if add_space_prefix else "never",
                                                       split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
