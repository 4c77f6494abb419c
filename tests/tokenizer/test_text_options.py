"""The per-request text options of DetokOpen and DetokStep: include_stop_str_in_output, skip_special_tokens,
spaces_between_special_tokens, and the text of single tokens (pieces), against transformers where it has them."""
from __future__ import annotations

import pytest

from protos.tandem.internal.v1 import engine_pb2, tokenizer_pb2 as pb
from tokenizer_svc import Detokenizer, RequestDetokenizer, StopStringMatcher
from tokenizer_svc.pieces import TokenPieces

NONE = engine_pb2.ENGINE_FINISH_NONE
STOP_TOKEN = engine_pb2.ENGINE_FINISH_STOP_TOKEN
LENGTH = engine_pb2.ENGINE_FINISH_LENGTH

WITH_SPECIALS = "<|im_start|>assistant\nSure!<|im_end|><|im_end|>\n<|im_start|>user\n🎉 你好<|endoftext|>"


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def stream(tokenizer, ids, **options):
    """The text of `ids` fed one token per step through a RequestDetokenizer, ending with a LENGTH finish."""
    request = RequestDetokenizer(tokenizer, **options)
    return "".join(request.step([i]).text for i in ids) + request.step([], LENGTH).text


class TestIncludeStopString:
    def test_matcher_emits_up_to_the_end_of_the_stop(self):
        assert StopStringMatcher(["STOP"], include_in_output=True).feed("before STOP after") == ("before STOP", "STOP")

    def test_matcher_holds_nothing_back_and_still_sees_a_stop_across_pieces(self):
        m = StopStringMatcher(["STOP"], include_in_output=True)
        assert m.feed("abc ST") == ("abc ST", None)
        assert m.held == ""
        assert m.feed("OP and more") == ("OP", "STOP")

    def test_matcher_flush_has_nothing_to_release(self):
        m = StopStringMatcher(["STOP"], include_in_output=True)
        assert m.feed("xST") == ("xST", None)
        assert m.flush() == ""

    @pytest.mark.parametrize("chunk", [1, 3, 100])
    def test_through_the_detokenizer(self, smollm, chunk):
        text = "The capital of France is Paris. It is big."
        ids = ids_of(smollm.tokenizer, text)
        request = RequestDetokenizer(smollm.tokenizer, ["Paris"], True, (), include_stop_str_in_output=True)
        out, consumed = "", 0
        for start in range(0, len(ids), chunk):
            outcome = request.step(ids[start:start + chunk])
            out += outcome.text
            consumed += outcome.consumed
            if outcome.finished:
                break
        assert out == "The capital of France is Paris"
        assert (outcome.matched_stop, outcome.finish) == ("Paris", NONE)
        assert smollm.tokenizer.decode(ids[:consumed]) == out  # " Paris" is one token: it ends the ids too

    def test_stop_token_text_stays_out(self, smollm):
        # Only stop strings are included; an EOS / stop token id's text is never shown.
        ids = ids_of(smollm.tokenizer, "Answer: 4") + [2]
        outcome = RequestDetokenizer(smollm.tokenizer, ["4!"], False, (), include_stop_str_in_output=True).step(
            ids, STOP_TOKEN)
        assert (outcome.text, outcome.finish, outcome.matched_stop) == ("Answer: 4", STOP_TOKEN, "")

    def test_detok_open_field(self, smollm):
        detok = Detokenizer(smollm.tokenizer)
        ids = ids_of(smollm.tokenizer, "one two three four")
        out = detok.handle(pb.DetokenizeInput(
            opens=[pb.DetokOpen(request_id="r", stop=["thr"], include_stop_str_in_output=True)],
            steps=[pb.DetokStep(request_id="r", token_ids=ids)]))
        (result,) = out.results
        assert (result.text, result.matched_stop, result.finished) == ("one two thr", "thr", True)
        assert list(result.token_ids) == ids[:3]  # " three" completed the stop; its "ee" is cut


class TestSpecialTokens:
    @pytest.mark.parametrize("skip", [True, False])
    def test_skip_special_tokens_matches_transformers(self, smollm, hf_smollm, skip):
        ids = ids_of(smollm.tokenizer, WITH_SPECIALS)
        expected = hf_smollm.decode(ids, skip_special_tokens=skip)
        assert stream(smollm.tokenizer, ids, skip_special_tokens=skip) == expected
        assert ("<|im_end|>" in expected) is not skip

    @pytest.mark.parametrize("spaces", [True, False])
    def test_spaces_between_special_tokens_byte_level_and_sentencepiece(self, smollm, hf_smollm, spm, spm_gguf,
                                                                        spaces):
        # transformers' fast tokenizers ignore the option: the text is the plain decode. Byte-level and Metaspace
        # decoders put no separator between adjacent special tokens, so dropping one changes nothing either.
        from transformers import AutoTokenizer

        hf_spm = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
        for ours, ref, text in ((smollm.tokenizer, hf_smollm, WITH_SPECIALS),
                                (spm.tokenizer, hf_spm, "hi<tool></s></s><s> world 🦙</s>")):
            ids = ids_of(ours, text)
            expected = ref.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces)
            assert expected == ref.decode(ids, skip_special_tokens=False)
            assert stream(ours, ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == expected

    def test_spaces_between_special_tokens_false_joins_adjacent_added_tokens(self):
        # A WordPiece decoder separates every token with a space. With the option off, an added token right
        # after another one comes without it (vLLM's fast detokenizer does the same); on, it is transformers'.
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens(["[CLS]", "[SEP]"])
        ids = tok.encode("[CLS] hellos [SEP] [SEP] world [SEP]", add_special_tokens=False).ids
        ref = PreTrainedTokenizerFast(tokenizer_object=tok)
        assert stream(tok, ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == \
            "[CLS] hellos [SEP] [SEP] world [SEP]"
        assert stream(tok, ids, skip_special_tokens=False, spaces_between_special_tokens=False) == \
            "[CLS] hellos [SEP][SEP] world [SEP]"
        # With a special token ending the prompt, the first generated one is adjacent to it.
        assert tok.id_to_token(ids[3]) == tok.id_to_token(ids[4]) == "[SEP]"
        assert stream(tok, ids[4:5], skip_special_tokens=False, spaces_between_special_tokens=False,
                      prompt_token_ids=ids[:4]) == "[SEP]"
        # Skipped special tokens leave nothing to join: the option is moot.
        assert stream(tok, ids, spaces_between_special_tokens=False) == ref.decode(ids, skip_special_tokens=True)

    def test_detok_open_fields(self, smollm):
        ids = ids_of(smollm.tokenizer, "a<|im_end|>")
        detok = Detokenizer(smollm.tokenizer)
        out = detok.handle(pb.DetokenizeInput(
            opens=[pb.DetokOpen(request_id="shown", skip_special_tokens=False, spaces_between_special_tokens=True),
                   pb.DetokOpen(request_id="skipped", skip_special_tokens=True)],
            steps=[pb.DetokStep(request_id=r, token_ids=ids, finish=LENGTH) for r in ("shown", "skipped")]))
        assert [r.text for r in out.results] == ["a<|im_end|>", "a"]


def _gpt2_char_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


GPT2_CHAR_TO_BYTE = _gpt2_char_to_byte()


def _byte_level_reference(token: str) -> str:
    """A byte-level vocabulary entry as text: the byte alphabet undone, invalid UTF-8 replaced."""
    return bytes(GPT2_CHAR_TO_BYTE[c] for c in token).decode("utf-8", errors="replace")


def _sentencepiece_reference(token: str) -> str:
    """A sentencepiece vocabulary entry as text: "▁" is a space, <0xNN> a byte, invalid UTF-8 replaced."""
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)]).decode("utf-8", errors="replace")
    return token.replace("\u2581", " ")


class TestPieces:
    def test_every_byte_level_token_against_transformers_vocabulary(self, smollm, hf_smollm):
        pieces = TokenPieces(smollm.tokenizer)
        ids = list(range(smollm.vocab_size))
        special = set(hf_smollm.all_special_ids)
        for i, token, piece in zip(ids, hf_smollm.convert_ids_to_tokens(ids), pieces(ids)):
            assert piece == (token if i in special else _byte_level_reference(token)), (i, token, piece)
        assert pieces([253, 2, 0]) == [" a", "<|im_end|>", "<|endoftext|>"]

    def test_every_sentencepiece_token_against_transformers_vocabulary(self, spm, spm_gguf):
        from transformers import AutoTokenizer

        hf_spm = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
        ids = list(range(spm.vocab_size))
        added = set(hf_spm.added_tokens_decoder)
        tokens = hf_spm.convert_ids_to_tokens(ids)
        for i, token, piece in zip(ids, tokens, TokenPieces(spm.tokenizer)(ids)):
            assert piece == (token if i in added else _sentencepiece_reference(token)), (i, token, piece)
        # Decoded alone, "▁world"-like pieces would lose their space; a piece keeps it, as it reads mid-text.
        word = next(i for i, t in enumerate(tokens) if t.startswith("\u2581") and len(t) > 2)
        assert hf_spm.decode([word]) == tokens[word][1:]
        assert TokenPieces(spm.tokenizer)([word]) == [" " + tokens[word][1:]]

    def test_pieces_of_whole_characters_concatenate_to_the_text(self, smollm):
        text = "Hello, world! Ünïcödé and 中文"
        ids = ids_of(smollm.tokenizer, text)
        pieces = TokenPieces(smollm.tokenizer)(ids)
        if "\ufffd" not in "".join(pieces):
            assert "".join(pieces) == text

    def test_outside_the_vocabulary_is_empty(self, smollm):
        assert TokenPieces(smollm.tokenizer)([smollm.vocab_size, 10**9]) == ["", ""]

    def test_detok_step_pieces(self, smollm):
        detok = Detokenizer(smollm.tokenizer)
        ids = ids_of(smollm.tokenizer, "one two three")
        alternatives = [253, 2, ids[0]]
        out = detok.handle(pb.DetokenizeInput(
            opens=[pb.DetokOpen(request_id="r", stop=["two"])],
            steps=[pb.DetokStep(request_id="r", token_ids=ids[:1], piece_token_ids=alternatives)]))
        assert list(out.results[0].pieces) == [" a", "<|im_end|>", "one"]
        # Also on the step a stop string ends: pieces answer every id asked for.
        out = detok.handle(pb.DetokenizeInput(
            steps=[pb.DetokStep(request_id="r", token_ids=ids[1:], piece_token_ids=ids[1:])]))
        (result,) = out.results
        assert result.finished and result.matched_stop == "two"
        assert list(result.pieces) == [" two", " three"]
        # A step without piece ids gets none.
        detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="q")]))
        assert list(detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id="q", token_ids=ids)]))
                    .results[0].pieces) == []
