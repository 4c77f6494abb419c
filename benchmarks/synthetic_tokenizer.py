"""A tokenizer built at run time for a model that has none (a config .json or weights without tokenizer.json, served
with random weights), so a stack benchmark needs no download: a GPU machine has no network.

Every id of the config's vocabulary is a token, so any id a random-weight model samples decodes. The config's
BOS and EOS ids are special tokens ("<bos>", "<eos>", "<eos1>"...), the first other free id is "<unk>", and every
remaining id is a word with a leading space (" aa", " ab", ... then three and four letters): byte-level
pre-tokenization splits text at spaces, so a text of k such words encodes to exactly k ids, which is what
benchmarks/stack_run.py builds its prompts from. Nothing is added to an encoding (no BOS).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import string
import tempfile
from pathlib import Path
from typing import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

SYNTHETIC = "synthetic"
UNK, BOS, EOS = "<unk>", "<bos>", "<eos>"
_SPACE = "\u0120"   # how the byte-level alphabet spells a space


def needs_synthetic(model: str) -> bool:
    """A model with no tokenizer of its own: a config .json, or a directory without tokenizer.json."""
    path = Path(model)
    return path.suffix == ".json" or (path.is_dir() and not (path / "tokenizer.json").exists())


def _words() -> Iterator[str]:
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            yield "".join(letters)


def _special_tokens(vocab_size: int, bos: int | None, eos: tuple[int, ...]) -> dict[int, str]:
    specials = {i: EOS if k == 0 else f"{EOS}{k}" for k, i in enumerate(eos) if 0 <= i < vocab_size}
    if bos is not None and 0 <= bos < vocab_size and bos not in specials:
        specials[bos] = BOS
    specials[next(i for i in range(vocab_size) if i not in specials)] = UNK
    return specials


def build_tokenizer(vocab_size: int, bos: int | None, eos: tuple[int, ...]) -> Tokenizer:
    specials = _special_tokens(vocab_size, bos, eos)
    words = _words()
    vocab = {specials[i] if i in specials else _SPACE + next(words): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    return tokenizer


def write_synthetic_tokenizer(model: str, directory: Path) -> Path:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json (every EOS id) for `model`'s
    config into directory, which then loads like an HF model's tokenizer; returns directory."""
    from engine_svc.loader import read_model_config

    cfg = read_model_config(Path(model))
    tokenizer = build_tokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    names = {"unk_token": UNK}
    if cfg.bos_token_id is not None and tokenizer.id_to_token(cfg.bos_token_id) == BOS:
        names["bos_token"] = BOS
    if tokenizer.token_to_id(EOS) is not None:
        names["eos_token"] = EOS
    (directory / "tokenizer_config.json").write_text(json.dumps(names))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(cfg.eos_token_ids)}))
    return directory


@contextlib.contextmanager
def tokenizer_model(tokenizer: str | None, model: str) -> Iterator[str | None]:
    """The tokenizer model a stack benchmark serves: `tokenizer` as given, or for SYNTHETIC a directory built for
    `model` in a temporary folder that is removed afterwards."""
    if tokenizer != SYNTHETIC:
        yield tokenizer
        return
    with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as tmp:
        yield str(write_synthetic_tokenizer(model, Path(tmp)))
