"""Helpers shared by the loaders: special-token bookkeeping and the BOS/EOS post-processor."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, processors


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)


def bos_eos_post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """`[BOS] $A [EOS]` with either end optional: what HF builds from add_bos_token / add_eos_token."""
    single = " ".join(p for p in (bos and f"{bos[0]}:0", "$A:0", eos and f"{eos[0]}:0") if p)
    pair = " ".join(p for p in (single, bos and f"{bos[0]}:1", "$B:1", eos and f"{eos[0]}:1") if p)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])


def adds_bos(tokenizer: Tokenizer, bos_id: int | None) -> bool:
    """Whether encoding with special tokens puts BOS first, whatever configured the post-processor."""
    return bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos_id]


def unique_ids(ids: Iterable[int | None]) -> tuple[int, ...]:
    """The ids in first-seen order without None or repeats."""
    seen: dict[int, None] = {}
    for i in ids:
        if i is not None:
            seen.setdefault(int(i), None)
    return tuple(seen)
