"""The tokenizer built from SmolLM2's GGUF metadata against transformers' tokenizer from the same file."""
from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from tokenizer_svc.gguf_metadata import read_gguf_metadata

SAMPLES = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "Phone: +1-555-0100, order #12345, 1,000,000.50 USD",
    "line one\nline two\n\nline four\r\n",
    " leading space and trailing space ",
    "tabs\tand\tmore\ttabs",
    "Emoji: 🎉🚀👍🏽 ❤️ 🇫🇷 family 👨‍👩‍👧",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Mixed: naïve café — “quoted” ‘text’ … done",
    "def f(x):\n    return x ** 2 + 1\n\nprint(f(3))",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|im_start|><|endoftext|>",
    "<|im_start|> spaced <|im_end|>",
    "it's, we're, they'll, I'd, you've",
    "ALLCAPS and camelCase and snake_case_name",
    "",
    "a",
]

# Runs of two or more whitespace characters before a digit: the one construct where transformers differs.
WHITESPACE_THEN_DIGITS = ["x =  1", "    42", "a\n\n7", "tab\t\t9 and  10", "  123  456"]


def test_ids_match_transformers(smollm, hf_smollm):
    for text in SAMPLES:
        ours = smollm.encode_text(text)
        assert ours == hf_smollm.encode(text, add_special_tokens=True), text
        assert smollm.decode(ours) == hf_smollm.decode(ours) == text


def test_special_tokens_are_never_split(smollm):
    assert smollm.encode_text("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert smollm.encode_text("a<|im_end|>b")[1] == 2


def test_digits_after_whitespace_follow_smollm2_not_transformers_gguf(smollm, hf_smollm):
    # SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual_digits=True) then ByteLevel, and llama.cpp's
    # "smollm" pre-tokenizer likewise splits every \p{N} before the GPT-2 regex. transformers 5.23's GGUF converter
    # has no entry for tokenizer.ggml.pre == "smollm" and falls back to plain ByteLevel, whose `\s+(?!\S)` leaves
    # the last space of a run to join ` ?\p{N}+`: "  1" becomes [Ġ, Ġ, 1] there instead of SmolLM2's [ĠĠ, 1].
    tok = smollm.tokenizer
    assert [tok.id_to_token(i) for i in smollm.encode_text("x =  1")] == ["x", "Ġ=", "ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in smollm.encode_text("    42")] == ["ĠĠĠĠ", "4", "2"]
    assert [tok.id_to_token(i) for i in hf_smollm.encode("x =  1")] == ["x", "Ġ=", "Ġ", "Ġ", "1"]

    # With SmolLM2's pre-tokenizer put back, transformers' tokenizer agrees with ours everywhere.
    fixed = hf_smollm.backend_tokenizer
    saved = fixed.pre_tokenizer
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    try:
        for text in SAMPLES + WHITESPACE_THEN_DIGITS:
            assert smollm.encode_text(text) == fixed.encode(text).ids, text
    finally:
        fixed.pre_tokenizer = saved


def test_model_facts(smollm):
    assert smollm.vocab_size == 49152
    assert smollm.eos_token_ids == (2,)
    assert smollm.tokenizer.id_to_token(2) == "<|im_end|>"
    assert smollm.add_bos_token is False
    assert smollm.chat_template is not None
    assert smollm.special_token_ids == frozenset(range(17))


def test_metadata_reader_matches_gguf_reader(smollm2_gguf):
    from gguf import GGUFReader

    ours = read_gguf_metadata(smollm2_gguf)
    reference = GGUFReader(smollm2_gguf)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields for the header
            continue
        assert key in ours, key
        expected = field.contents()
        if isinstance(expected, float):
            assert ours[key] == pytest.approx(expected), key
        else:
            assert ours[key] == expected, key
