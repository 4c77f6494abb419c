"""Shared fixtures for the tokenizer service tests: the real SmolLM2 tokenizer and a tiny trained HF directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenizer_svc import LoadedTokenizer, load_tokenizer

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 67890",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "こんにちは世界 안녕하세요 세계",
    "Emoji time 🎉🎉 🚀 👍🏽 ❤️ 🇫🇷 and more 😀😀😀",
    "Ünïcödé àccents — “quotes” and ‘single’ … ellipsis",
    "    indented line\n\ttabbed line\r\nwindows newline",
] * 20

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return tok


def _write_hf_dir(directory: Path, tokenizer, config: dict, generation_config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
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
    """A byte-level BPE directory with a ChatML template that adds BOS, and an extra EOS in generation_config."""
    return _write_hf_dir(
        tmp_path_factory.mktemp("tiny_hf"), tiny_tokenizer,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
         "eos_token": {"content": "<|im_end|>", "special": True}, "add_bos_token": True,
         "chat_template": CHATML_TEMPLATE},
        generation_config={"eos_token_id": [tiny_tokenizer.token_to_id("<|im_end|>"),
                                            tiny_tokenizer.token_to_id("<|endoftext|>")]})


@pytest.fixture(scope="session")
def tiny_hf_dir_no_template(tmp_path_factory, tiny_tokenizer) -> Path:
    return _write_hf_dir(tmp_path_factory.mktemp("tiny_hf_plain"), tiny_tokenizer,
                         {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})


@pytest.fixture(scope="session")
def smollm(smollm2_gguf) -> LoadedTokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_smollm(smollm2_gguf):
    """transformers' tokenizer built from the same GGUF: the reference (see test_gguf_tokenizer for its one flaw)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
