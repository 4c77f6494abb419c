"""Builds a `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from tokenizer_svc.chat_template import ChatTemplate
from tokenizer_svc.gguf_metadata import read_gguf_metadata
from tokenizer_svc.loaded import LoadedTokenizer
from tokenizer_svc.sentencepiece_bpe import build_sentencepiece_bpe
from tokenizer_svc.special_tokens import adds_bos, bos_eos_post_processor, special_token_ids, unique_ids

_K = "tokenizer.ggml."


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer equal to llama.cpp's pre-tokenizer regexes for `tokenizer.ggml.pre`.

    llama.cpp splits every \\p{N} into its own piece before the GPT-2 regex for starcoder-family vocabularies
    (SmolLM2's "smollm" among them); HF's own tokenizer.json for these models says the same with
    Digits(individual_digits=True) followed by ByteLevel. Unknown values are refused, not guessed: a wrong
    pre-tokenizer silently changes ids for digits and whitespace.
    """
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return gpt2
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    raise ValueError(f"GGUF {_K}pre {pre!r} is not supported for byte-level BPE "
                     "(supported: gpt2, smollm, starcoder, refact, codeshell)")


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges = []
    for merge in meta.get(_K + "merges", []):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"GGUF merge {merge!r} is not two space-separated tokens")
        merges.append((left, right))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get(_K + "pre", "<missing>"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_typed_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """CONTROL and USER_DEFINED tokens become added tokens, so text that spells them is never split."""
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t == TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == TokenType.USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _token_at(tokens: list[str], index: Any) -> tuple[str, int] | None:
    if isinstance(index, int) and 0 <= index < len(tokens):
        return tokens[index], index
    return None


def load_gguf(path: Path) -> LoadedTokenizer:
    meta = read_gguf_metadata(path)
    model = meta.get(_K + "model")
    tokens = meta.get(_K + "tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{path} has no {_K}tokens: it carries no tokenizer")
    token_types = meta.get(_K + "token_type") or [int(TokenType.NORMAL)] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(f"{path}: {_K}token_type has {len(token_types)} entries for {len(tokens)} tokens")

    if model == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens)
        default_add_bos = False
    elif model == "llama":
        add_prefix = bool(meta.get(_K + "add_space_prefix", True))
        tokenizer = build_sentencepiece_bpe(tokens, meta.get(_K + "scores"), token_types,
                                            meta.get(_K + "unknown_token_id"), add_prefix)
        default_add_bos = True
    else:
        raise ValueError(f"GGUF {_K}model {model!r} is not supported (supported: gpt2, llama)")
    _add_typed_tokens(tokenizer, tokens, token_types)

    bos = _token_at(tokens, meta.get(_K + "bos_token_id"))
    eos = _token_at(tokens, meta.get(_K + "eos_token_id"))
    add_bos = bool(meta.get(_K + "add_bos_token", default_add_bos))
    add_eos = bool(meta.get(_K + "add_eos_token", False))
    tokenizer.post_processor = bos_eos_post_processor(bos if add_bos else None, eos if add_eos else None)

    named = {"bos_token": bos, "eos_token": eos,
             "unk_token": _token_at(tokens, meta.get(_K + "unknown_token_id")),
             "pad_token": _token_at(tokens, meta.get(_K + "padding_token_id"))}
    template_tokens = {name: tok[0] for name, tok in named.items() if tok is not None}
    source = meta.get("tokenizer.chat_template")
    return LoadedTokenizer(
        tokenizer=tokenizer,
        # llama.cpp also ends generation on end-of-turn / end-of-message ids when the GGUF names them.
        eos_token_ids=unique_ids([eos and eos[1], meta.get(_K + "eot_token_id"), meta.get(_K + "eom_token_id")]),
        bos_token_id=bos[1] if bos else None,
        add_bos_token=adds_bos(tokenizer, bos[1] if bos else None),
        special_token_ids=special_token_ids(tokenizer),
        chat_template=ChatTemplate(source, template_tokens) if isinstance(source, str) and source else None,
        source=str(path),
    )
