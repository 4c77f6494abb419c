"""GGUF files written for the tokenizer tests: any vocabulary, and a small sentencepiece-style ("llama") one with
byte fallback (a plain module: tests/ has no packages to import conftest from)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from tok_samples import TINY_CORPUS


def write_gguf(path: Path, tokens, types, *, model: str, scores=None, merges=None, pre=None, **extra) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_spm_gguf(directory: Path) -> Path:
    """A sentencepiece-style BPE vocabulary: <unk>, <s>, </s>, 256 byte pieces, a user-defined <tool>, then
    pieces trained with tokenizers and scored like sentencepiece (a merged piece scores minus its merge rank)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trained.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    rank = {"".join(m): r for r, m in enumerate(model["merges"])}
    by_id = sorted(model["vocab"], key=model["vocab"].get)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<tool>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.USER_DEFINED]
    scores = [0.0] * len(tokens)
    for piece in sorted((t for t in by_id if t in rank), key=rank.get):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[piece]))
    for i, piece in enumerate(t for t in by_id if t not in rank):  # single characters: never a merge result
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1e6 - i)
    return write_gguf(directory / "tiny-llama.gguf", tokens, [int(t) for t in types],
                      model="llama", scores=scores, unk_token_id=0, add_bos_token=True)
