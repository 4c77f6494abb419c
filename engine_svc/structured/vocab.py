"""The model's vocabulary as xgrammar needs it (TokenizerInfo), read from the same files the engine loads: a GGUF's
tokenizer metadata, or an HF directory's tokenizer.json (with the `tokenizers` package). The engine never imports
the tokenizer service: it only needs each token's text, not encoding.

Special (control) tokens are given as empty strings, which xgrammar treats as never part of a grammar's text:
the detokenizer drops them, so allowing `<|im_start|>` inside a JSON string would make text that no longer
follows the grammar. EOS stays the grammar's stop token.
"""
from __future__ import annotations

import json
from pathlib import Path

import xgrammar as xgr

# GGUF token types (gguf.TokenType) that are not text: UNKNOWN, CONTROL, UNUSED.
_NOT_TEXT = frozenset({2, 3, 5})
_GGUF_VOCAB_TYPES = {"gpt2": xgr.VocabType.BYTE_LEVEL, "llama": xgr.VocabType.BYTE_FALLBACK}


class NoVocabulary(ValueError):
    """The model's files hold no vocabulary the grammar engine can read."""


def tokenizer_info(model_path: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> xgr.TokenizerInfo:
    """vocab_size: the model's (its logits' width); tokens past the tokenizer's vocabulary are never allowed."""
    path = Path(model_path)
    if path.suffix == ".gguf":
        tokens, vocab_type, prefix_space = _gguf_vocab(path)
    elif path.is_dir() and (path / "tokenizer.json").is_file():
        tokens, vocab_type, prefix_space = _hf_vocab(path / "tokenizer.json")
    else:
        raise NoVocabulary(f"the model {path.name} has no tokenizer vocabulary (a GGUF, or a directory with "
                           f"tokenizer.json) for structured output")
    tokens = tokens[:vocab_size]
    return xgr.TokenizerInfo(tokens, vocab_type, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids),
                             add_prefix_space=prefix_space)


def _gguf_vocab(path: Path) -> tuple[list[str], xgr.VocabType, bool]:
    from engine_svc.loader.gguf_loader import gguf_field, open_gguf

    reader = open_gguf(path)
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model not in _GGUF_VOCAB_TYPES:
        raise NoVocabulary(f"GGUF tokenizer model {model!r} is not supported for structured output "
                           f"(supported: {sorted(_GGUF_VOCAB_TYPES)})")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", [])
    types = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tokens = ["" if t in _NOT_TEXT else tok for tok, t in zip(tokens, types)]
    prefix_space = model == "llama" and bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    return tokens, _GGUF_VOCAB_TYPES[model], prefix_space


def _hf_vocab(path: Path) -> tuple[list[str], xgr.VocabType, bool]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    for added in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []):
        if added.get("special"):
            tokens[added["id"]] = ""
    # xgrammar's own reading of a tokenizer.json (what its from_huggingface does for fast tokenizers).
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return tokens, meta["vocab_type"], meta["add_prefix_space"]
