"""GGUF tokenizers other than SmolLM2's: a synthetic sentencepiece ("llama") vocabulary against transformers, and
clear errors for what is not supported."""
from __future__ import annotations

import pytest

from gguf_samples import write_gguf
from tok_samples import TINY_CORPUS
from tokenizer_svc import load_tokenizer

SAMPLES = TINY_CORPUS[:7] + ["  two spaces", " lead", "a\nb", "x<tool>y", "<s>hi</s>", "Ωmega ☃ 🦙 (byte fallback)", ""]


def test_sentencepiece_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    ours = load_tokenizer(spm_gguf)
    ref = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    for text in SAMPLES:
        ids = ours.encode_text(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
        plain = ours.decode(ids, skip_special_tokens=True)
        assert plain == ref.decode(ids, skip_special_tokens=True)
        # The decoder strips the one space the pre-tokenizer prepended, so a text's own leading space goes too.
        expected = text.replace("<s>", "").replace("</s>", "")
        assert plain == (expected[1:] if expected.startswith(" ") else expected)
    assert ours.encode_text("hi")[0] == 1 and ours.add_bos_token
    tool = ours.tokenizer.token_to_id("<tool>")
    assert tool in ours.encode_text("x<tool>y") and tool not in ours.special_token_ids


def test_sentencepiece_incremental_decode(spm_gguf):
    from tokenizer_svc import RequestDetokenizer
    from protos.tandem.internal.v1 import engine_pb2

    tok = load_tokenizer(spm_gguf).tokenizer
    prompt = tok.encode("Say:", add_special_tokens=False).ids
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False).ids
        request = RequestDetokenizer(tok, (), True, prompt)
        out = "".join(request.step([i]).text for i in ids) + request.step([], engine_pb2.ENGINE_FINISH_LENGTH).text
        # With a prompt as context, a leading "▁" decodes as the space it is mid-text, and byte-fallback
        # characters come out whole.
        full = tok.decode(prompt + ids, skip_special_tokens=True)
        assert out == full[len(tok.decode(prompt, skip_special_tokens=True)):], text
        assert "\ufffd" not in out


def test_unsupported_model_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", ["<pad>", "<s>", "</s>", "a"], [3, 3, 3, 1], model="t5",
                       scores=[0.0] * 4)
    with pytest.raises(ValueError, match="tokenizer.ggml.model 't5' is not supported"):
        load_tokenizer(path)


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", ["<|endoftext|>", "<s>", "</s>", "a", "b", "ab"], [3, 3, 3, 1, 1, 1],
                       model="gpt2", merges=["a b"], pre="qwen2")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        load_tokenizer(path)


def test_plain_gpt2_pre_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", ["<|endoftext|>", "<s>", "</s>", "a", "b", "ab", "1", "\u0120"],
                       [3, 3, 3, 1, 1, 1, 1, 1], model="gpt2", merges=["a b"], pre="gpt2")
    loaded = load_tokenizer(path)
    assert loaded.encode_text("ab1") == [5, 6]
    assert not loaded.add_bos_token and loaded.eos_token_ids == (2,) and loaded.chat_template is None


def test_stray_byte_after_a_whole_character(spm):
    # ByteFallback decodes a byte run with any invalid byte as U+FFFDs only, so "你" followed by a stray
    # continuation byte reads "����" in the end. Sent early, "你" would have to be taken back (DecodeStream fails
    # with "Invalid prefix", which ended the whole Detokenize stream): the run is held until it ends instead.
    from protos.tandem.internal.v1 import engine_pb2, tokenizer_pb2 as pb
    from tokenizer_svc import Detokenizer

    tok = spm.tokenizer
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in (0x00, 0x80, 0xE4, 0xBD, 0xA0)}
    word = tok.encode("hello", add_special_tokens=False).ids
    ni = [byte[0xE4], byte[0xBD], byte[0xA0]]
    for ids in (word + ni + [byte[0x80]] + word, word + [byte[0x00], byte[0x80]] + word, word + ni + word,
                ni + [byte[0x80]]):
        detok = Detokenizer(tok)
        detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="odd"), pb.DetokOpen(request_id="ok")]))
        text = ""
        for k, i in enumerate(ids):
            last = k == len(ids) - 1
            finish = engine_pb2.ENGINE_FINISH_LENGTH if last else engine_pb2.ENGINE_FINISH_NONE
            out = detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id="odd", token_ids=[i], finish=finish),
                                                         pb.DetokStep(request_id="ok", token_ids=word[:1])]))
            text += out.results[0].text
        assert text == tok.decode(ids), ids
        assert "ok" in detok  # the other request goes on
    assert tok.decode(word + ni + word).count("你") == 1
