"""Incremental detokenization: deltas concatenate to the full decode and never split a character."""
from __future__ import annotations

import random

import pytest

from protos.tandem.internal.v1 import engine_pb2
from tokenizer_svc import IncrementalDecoder, RequestDetokenizer, load_tokenizer

NONE, LENGTH = engine_pb2.ENGINE_FINISH_NONE, engine_pb2.ENGINE_FINISH_LENGTH

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 🎉🚀👍🏽 ❤️ 🇫🇷 👨‍👩‍👧 and text after.",
    "中文：你好，世界！日本語 한국어 텍스트",
    "Mixed 🎉中文 naïve café — “quotes” …\n\tcode: x = [1, 2, 3]",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|im_start|>user\n🎉<|im_end|>",
    "   leading spaces\n\n\nand newlines   ",
    "🦙",
]
CHUNKS = [1, 2, 3, 7]


def run_chunks(tokenizer, ids, chunk, skip, prompt=(), finish_last=LENGTH):
    """Feeds `ids` in chunks through a RequestDetokenizer; returns the deltas."""
    request = RequestDetokenizer(tokenizer, (), skip, prompt)
    deltas = []
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        outcome = request.step(ids[start:start + chunk], finish_last if last else NONE)
        assert outcome.consumed == len(ids[start:start + chunk])
        assert outcome.finished == last
        deltas.append(outcome.text)
    return deltas


@pytest.fixture(scope="module", params=["smollm", "tiny_hf"])
def tok(request, smollm, tiny_hf_dir):
    return smollm.tokenizer if request.param == "smollm" else load_tokenizer(tiny_hf_dir).tokenizer


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_deltas_concatenate_to_full_decode(tok, chunk, skip):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas = run_chunks(tok, ids, chunk, skip)
        assert "".join(deltas) == full, (text, deltas)
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), deltas


@pytest.mark.parametrize("chunk", CHUNKS)
def test_with_prompt_context(smollm, chunk):
    tok = smollm.tokenizer
    prompt = smollm.encode_chat([{"role": "user", "content": "Say hi in Chinese 🙂"}])
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            deltas = run_chunks(tok, ids, chunk, skip, prompt)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            # The generated text as it reads after the prompt: the same, since byte-level decoding has no context.
            assert "".join(deltas) == tok.decode(prompt + ids, skip_special_tokens=skip)[
                len(tok.decode(prompt, skip_special_tokens=skip)):]


def test_partial_character_is_held_back(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("a🎉", add_special_tokens=False).ids
    assert len(ids) >= 3  # "a", then the emoji's 4 bytes in more than one token
    decoder = IncrementalDecoder(tok, (), skip_special_tokens=False)
    deltas = [decoder.push(i) for i in ids]
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])
    assert deltas[-1] == "🎉"


@pytest.mark.parametrize("text", ["🎉", "你好", "a🦙b"])
def test_prompt_ending_mid_character(smollm, text):
    # Only raw prompt ids can end inside a character (encoded text cannot). The generated ids then decode on
    # their own: the prompt's dangling bytes are not re-emitted, and the orphan continuation bytes show as U+FFFD.
    tok = smollm.tokenizer
    ids = tok.encode(text, add_special_tokens=False).ids
    for cut in range(1, len(ids)):
        decoder = IncrementalDecoder(tok, ids[:cut], skip_special_tokens=False)
        out = "".join(decoder.push(i) for i in ids[cut:]) + decoder.flush()
        assert out == tok.decode(ids[cut:]), (text, cut)


def test_flush_shows_unfinished_bytes_as_decode_does(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("ok🎉", add_special_tokens=False).ids[:-1]  # the emoji's last byte never comes
    deltas = run_chunks(tok, ids, 1, False, finish_last=LENGTH)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_including_invalid_utf8(smollm, seed):
    tok = smollm.tokenizer
    rng = random.Random(seed)
    byte_tokens = [i for i in range(tok.get_vocab_size()) if len(tok.id_to_token(i)) == 1]
    for _ in range(20):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(tok.get_vocab_size())
               for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            chunk = rng.choice(CHUNKS)
            assert "".join(run_chunks(tok, ids, chunk, skip)) == tok.decode(ids, skip_special_tokens=skip)
