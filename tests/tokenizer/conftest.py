"""Shared fixtures for the tokenizer service tests: the real SmolLM2 tokenizer and a tiny trained HF directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gguf_samples import write_spm_gguf
from tok_samples import CHATML_TEMPLATE, SPECIAL_TOKENS, TINY_CORPUS
from tokenizer_svc import LoadedTokenizer, load_tokenizer


def _train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return tok


def _write_hf_dir(directory: Path, tokenizer, config: dict, generation_config: dict | None = None,
                  add_bos: bool = False) -> Path:
    from tokenizers import Tokenizer, processors

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    if add_bos:
        bos = "<|endoftext|>"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A byte-level BPE directory whose tokenizer.json adds BOS, with a ChatML template that writes BOS itself
    and an extra EOS in generation_config. tokenizer_config's add_bos_token=False is ignored, as in transformers."""
    return _write_hf_dir(
        tmp_path_factory.mktemp("tiny_hf"), tiny_tokenizer,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
         "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}, "add_bos_token": False,
         "chat_template": CHATML_TEMPLATE},
        generation_config={"eos_token_id": [tiny_tokenizer.token_to_id("<|im_end|>"),
                                            tiny_tokenizer.token_to_id("<|endoftext|>")]},
        add_bos=True)


@pytest.fixture(scope="session")
def tiny_hf_dir_no_template(tmp_path_factory, tiny_tokenizer) -> Path:
    return _write_hf_dir(tmp_path_factory.mktemp("tiny_hf_plain"), tiny_tokenizer,
                         {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                          "bos_token": "<|endoftext|>", "add_bos_token": True})


@pytest.fixture(scope="session")
def smollm(smollm2_gguf) -> LoadedTokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm(smollm2_gguf):
    """transformers' tokenizer built from the same GGUF: the reference (see test_gguf_tokenizer for its one flaw)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def spm_gguf(tmp_path_factory) -> Path:
    """A small sentencepiece-style GGUF vocabulary with byte fallback (see gguf_samples.write_spm_gguf)."""
    return write_spm_gguf(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def spm(spm_gguf) -> LoadedTokenizer:
    return load_tokenizer(spm_gguf)
