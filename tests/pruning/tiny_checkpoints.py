"""A tiny random Llama with a byte-level tokenizer (ids 0-255 of its 320), which the calibration needs, and the
prunes the pruning tests share."""
from __future__ import annotations

import json
from pathlib import Path

CALIB_TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
              "do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
              "conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or "
              "conversations?' So she was considering in her own mind (as well as she could, for the hot day made "
              "her feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the "
              "trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close "
              "by her.")


def write_byte_tokenizer(directory: Path) -> None:
    """Byte-level BPE without merges: every byte is a token, ids 0-255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_tiny_source(directory: Path, seed: int = 5) -> Path:
    from tests.engine.tiny_models import write_tiny_llama

    write_tiny_llama(directory, seed=seed, max_position_embeddings=256)
    write_byte_tokenizer(directory)
    return directory


def prune_config(source: Path, output: Path, method: str, sparsity: str, calib: Path, calib_tokens: int = 300,
                 calib_window: int = 128):
    from engine_svc.pruning.spec import PruneConfig, parse_sparsity
    return PruneConfig(source=source, output=output, method=method, sparsity=parse_sparsity(sparsity),
                       calib_text=calib, calib_tokens=calib_tokens, calib_window=calib_window, device="cpu")
