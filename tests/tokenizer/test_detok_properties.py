"""Streaming detokenization, property-based: random token id sequences mixing real tokenizations of emoji, CJK
and accented text, lone byte tokens (incomplete or invalid UTF-8), special tokens and arbitrary vocabulary ids,
on SmolLM2's byte-level BPE and a sentencepiece vocabulary with byte fallback.

Properties, against the tokenizer's own `decode` (transformers gives the same text, see test_gguf_tokenizer and
test_sentencepiece_gguf):
- the deltas, however the ids are grouped into steps, concatenate to the decode of all ids (after the prompt);
- after every token the text sent so far is a prefix of that final text and of the decode of the ids so far:
  text is never taken back, and a U+FFFD is sent only where the full decode has one at that point;
- once the ids so far decode to whole characters (no U+FFFD at the end), nothing is held back; except, with byte
  fallback, while a run of byte tokens is open (a later stray byte would make `decode` rewrite the whole run).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protos.tandem.internal.v1 import engine_pb2
from tokenizer_svc import IncrementalDecoder, RequestDetokenizer

NONE = engine_pb2.ENGINE_FINISH_NONE
LENGTH = engine_pb2.ENGINE_FINISH_LENGTH

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WORDS = ["🎉", "🚀", "👍🏽", "❤️", "🇫🇷", "👨‍👩‍👧", "你好", "世界", "天气很好", "こんにちは", "안녕", "naïve", "café", " Ωmega",
         "☃", "🦙", " the", "Hello", "\n", "  ", "12"]


class Vocab:
    """Pools of ids to draw from: words (whole tokenizations), byte tokens, special tokens, any id."""

    def __init__(self, loaded, byte_ids, byte_fallback: bool):
        self.tokenizer = loaded.tokenizer
        self.byte_fallback = byte_fallback
        self.words = [self.tokenizer.encode(w, add_special_tokens=False).ids for w in WORDS]
        self.byte_ids = byte_ids
        self.special_ids = sorted(loaded.special_token_ids)
        self.size = loaded.vocab_size
        self.prompt = self.tokenizer.encode("Say it:", add_special_tokens=False).ids


@pytest.fixture(scope="module", params=["smollm", "spm"])
def vocab(request, smollm, spm) -> Vocab:
    if request.param == "smollm":  # byte-level: the 1-character tokens of the byte alphabet
        tok = smollm.tokenizer
        return Vocab(smollm, [i for i in range(smollm.vocab_size) if len(tok.id_to_token(i)) == 1], False)
    tok = spm.tokenizer  # byte fallback: the <0xNN> tokens
    return Vocab(spm, [i for i in range(spm.vocab_size) if tok.id_to_token(i).startswith("<0x")], True)


@st.composite
def token_ids(draw, vocab: Vocab) -> list[int]:
    ids: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["word", "word", "word_part", "bytes", "special", "any"]))
        if kind == "word":
            ids += draw(st.sampled_from(vocab.words))
        elif kind == "word_part":  # a tokenization cut anywhere: characters left incomplete or orphaned
            word = draw(st.sampled_from(vocab.words))
            i = draw(st.integers(0, len(word)))
            ids += word[i:] if draw(st.booleans()) else word[:i]
        elif kind == "bytes":
            ids += draw(st.lists(st.sampled_from(vocab.byte_ids), min_size=1, max_size=4))
        elif kind == "special":
            ids.append(draw(st.sampled_from(vocab.special_ids)))
        else:
            ids.append(draw(st.integers(0, vocab.size - 1)))
    return ids


def expected_text(tokenizer, prompt, ids, skip):
    """The generated text as it reads after the prompt."""
    head = tokenizer.decode(prompt, skip_special_tokens=skip)
    full = tokenizer.decode(prompt + ids, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head):]


@SETTINGS
@given(data=st.data(), skip=st.booleans(), with_prompt=st.booleans())
def test_deltas_are_final_and_concatenate_to_decode(vocab, data, skip, with_prompt):
    tok = vocab.tokenizer
    ids = data.draw(token_ids(vocab), label="ids")
    prompt = vocab.prompt if with_prompt else []
    final = expected_text(tok, prompt, ids, skip)

    decoder = IncrementalDecoder(tok, prompt, skip)
    sent, run_open = "", False
    for k, i in enumerate(ids, start=1):
        sent += decoder.push(i)
        so_far = expected_text(tok, prompt, ids[:k], skip)
        assert final.startswith(sent) and so_far.startswith(sent), (ids[:k], sent, so_far)
        # A byte fallback run is open after a byte token, and stays open through special tokens decode skips.
        if vocab.byte_fallback and not (skip and i in vocab.special_ids):
            run_open = i in vocab.byte_ids
        if not so_far.endswith("\ufffd") and not run_open:
            assert sent == so_far, (ids[:k], sent, so_far)
    sent += decoder.flush()
    assert sent == final


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_any_grouping_into_steps_gives_the_same_text(vocab, data, skip):
    tok = vocab.tokenizer
    ids = data.draw(token_ids(vocab), label="ids")
    request = RequestDetokenizer(tok, (), skip, vocab.prompt)
    deltas, pos = [], 0
    while True:
        step = ids[pos:pos + data.draw(st.integers(1, 5), label="step")]
        pos += len(step)
        outcome = request.step(step, NONE if pos < len(ids) else LENGTH)
        deltas.append(outcome.text)
        if outcome.finished:
            break
    assert "".join(deltas) == expected_text(tok, vocab.prompt, ids, skip)
    for delta in deltas:  # whole characters only: a lone surrogate would mean a split code point
        assert not any("\ud800" <= c <= "\udfff" for c in delta)
