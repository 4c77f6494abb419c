"""Stop strings: the matcher alone, then through RequestDetokenizer with the real SmolLM2 tokenizer."""
from __future__ import annotations

import random

import pytest

from protos.tandem.internal.v1 import engine_pb2
from tokenizer_svc import RequestDetokenizer, StopStringMatcher

NONE = engine_pb2.ENGINE_FINISH_NONE
STOP_TOKEN = engine_pb2.ENGINE_FINISH_STOP_TOKEN
LENGTH = engine_pb2.ENGINE_FINISH_LENGTH


def feed_all(matcher, pieces):
    """[(emitted, matched)] for each piece, stopping after a match."""
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if out[-1][1] is not None:
            break
    return out


class TestMatcher:
    def test_holds_back_only_a_possible_prefix(self):
        m = StopStringMatcher(["STOP"])
        assert m.feed("abc S") == ("abc ", None)
        assert m.held == "S"
        assert m.feed("T") == ("", None)
        assert m.held == "ST"

    def test_releases_as_soon_as_it_cannot_match(self):
        m = StopStringMatcher(["STOP"])
        assert m.feed("xST") == ("x", None)
        assert m.feed("x") == ("STx", None)
        assert m.held == ""

    def test_releases_the_part_that_cannot_match_and_keeps_a_new_prefix(self):
        m = StopStringMatcher(["abab"])
        assert m.feed("aba") == ("", None)
        assert m.feed("a") == ("aba", None)  # "abaa": only the last "a" can still start "abab"
        assert m.held == "a"

    def test_no_holdback_without_a_possible_start(self):
        m = StopStringMatcher(["</answer>"])
        assert m.feed("plain text") == ("plain text", None)
        assert m.feed(" more <") == (" more ", None)

    def test_stop_beginning_mid_piece(self):
        m = StopStringMatcher(["STOP"])
        assert m.feed("helloST") == ("hello", None)
        assert m.feed("OP and more") == ("", "STOP")

    def test_stop_inside_one_piece_emits_text_before_it(self):
        assert StopStringMatcher(["STOP"]).feed("before STOP after") == ("before ", "STOP")

    def test_multi_piece_stop(self):
        assert feed_all(StopStringMatcher(["STOP"]), ["a", "S", "T", "O", "P", "z"]) == [
            ("a", None), ("", None), ("", None), ("", None), ("", "STOP")]

    def test_stop_at_the_very_start(self):
        assert StopStringMatcher(["Hi"]).feed("Hi there") == ("", "Hi")

    def test_the_stop_complete_first_wins(self):
        # "bc" is complete before "abcd" is, in one piece as in many: the split never changes the match.
        assert StopStringMatcher(["bc", "abcd"]).feed("xabcd") == ("xa", "bc")
        assert StopStringMatcher(["cd", "abc"]).feed("zabcd") == ("z", "abc")

    def test_same_end_prefers_the_earlier_start(self):
        assert StopStringMatcher(["b", "ab"]).feed("xab") == ("x", "ab")
        assert feed_all(StopStringMatcher(["b", "ab"]), ["x", "a", "b"])[-1] == ("", "ab")

    def test_same_start_prefers_the_shorter(self):
        assert StopStringMatcher(["abc", "ab"]).feed("xabc") == ("x", "ab")

    def test_a_complete_match_is_not_delayed_for_a_longer_one(self):
        m = StopStringMatcher(["abcd", "bc"])
        assert m.feed("ab") == ("", None)
        assert m.feed("c") == ("a", "bc")

    def test_two_stops_hold_the_longest_possible_tail(self):
        m = StopStringMatcher(["xyz", "yz!"])
        assert m.feed("axy") == ("a", None)  # "xy" could start "xyz"
        assert m.feed("q") == ("xyq", None)

    def test_flush_releases_held_text(self):
        m = StopStringMatcher(["STOP"])
        assert m.feed("abST") == ("ab", None)
        assert m.flush() == "ST"
        assert m.held == ""

    def test_empty_stop_strings_are_ignored(self):
        assert StopStringMatcher(["", "x"]).feed("abc") == ("abc", None)
        with pytest.raises(ValueError):
            StopStringMatcher([""])

    @pytest.mark.parametrize("seed", range(6))
    def test_never_leaks_and_holds_minimally(self, seed):
        rng = random.Random(seed)
        alphabet = "ab c🎉"
        for _ in range(200):
            stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
            pieces, i = [], 0
            while i < len(text):
                n = rng.randint(1, 4)
                pieces.append(text[i:i + n])
                i += n
            m = StopStringMatcher(stops)
            emitted, matched, seen = "", None, ""
            for piece in pieces:
                seen += piece
                out, matched = m.feed(piece)
                emitted += out
                assert not any(s in emitted for s in stops), (stops, pieces)
                if matched is not None:
                    assert seen[len(emitted):].startswith(matched)
                    break
                # Held text is exactly the longest tail of what was seen that is a proper prefix of a stop.
                assert emitted + m.held == seen
                longest = max((k for k in range(1, len(seen) + 1)
                               if any(len(s) > k and s.startswith(seen[-k:]) for s in stops)), default=0)
                assert len(m.held) == longest, (stops, seen, m.held)
            if matched is None:
                assert emitted + m.flush() == text
                assert not any(s in text for s in stops)
            else:
                assert text.startswith(emitted)


class TestThroughDetokenizer:
    TEXT = "The capital of France is Paris. It is big.\n\nNext question"

    def ids(self, smollm, text=None):
        return smollm.tokenizer.encode(text or self.TEXT, add_special_tokens=False).ids

    def stop_token_index(self, smollm, ids, stop):
        """The index of the token whose text completes the first occurrence of `stop`."""
        end = self.TEXT.index(stop) + len(stop)
        for k in range(len(ids)):
            if len(smollm.tokenizer.decode(ids[:k + 1])) >= end:
                return k
        raise AssertionError("stop not in text")

    @pytest.mark.parametrize("stop", ["Paris", "France is", "\n\n", "s. It", "The"])
    @pytest.mark.parametrize("chunk", [1, 3, 100])
    def test_truncates_ids_and_hides_the_stop(self, smollm, stop, chunk):
        ids = self.ids(smollm)
        k = self.stop_token_index(smollm, ids, stop)
        request = RequestDetokenizer(smollm.tokenizer, [stop], True, ())
        text, consumed = "", 0
        for start in range(0, len(ids), chunk):
            step = ids[start:start + chunk]
            outcome = request.step(step, NONE)
            text += outcome.text
            consumed += outcome.consumed
            if outcome.finished:
                assert outcome.matched_stop == stop and outcome.finish == NONE
                assert start <= k < start + len(step) and outcome.consumed == k - start + 1
                break
        else:
            raise AssertionError("stop string never matched")
        assert text == self.TEXT[:self.TEXT.index(stop)]
        assert consumed == k + 1

    def test_stop_in_a_finishing_step_wins(self, smollm):
        ids = self.ids(smollm)
        outcome = RequestDetokenizer(smollm.tokenizer, ["Paris"], True, ()).step(ids, LENGTH)
        assert outcome == (self.TEXT[:self.TEXT.index("Paris")], self.stop_token_index(smollm, ids, "Paris") + 1,
                           True, NONE, "Paris")

    def test_finish_flushes_held_text(self, smollm):
        ids = self.ids(smollm, "It is in Paris")
        request = RequestDetokenizer(smollm.tokenizer, ["Paris!"], True, ())
        first = request.step(ids, NONE)
        assert first.text == "It is in " and not first.finished  # "Paris" could still become "Paris!"
        last = request.step([], LENGTH)
        assert last == ("Paris", 0, True, LENGTH, "")

    def test_stop_token_text_is_excluded_and_held_text_flushed(self, smollm):
        ids = self.ids(smollm, "Answer: 4") + [2]  # <|im_end|>
        for stops in ([], ["4!"]):
            outcome = RequestDetokenizer(smollm.tokenizer, stops, False, ()).step(ids, STOP_TOKEN)
            assert outcome == ("Answer: 4", len(ids), True, STOP_TOKEN, "")

    def test_stop_string_matching_special_token_text(self, smollm):
        ids = self.ids(smollm, "done<|im_end|>")
        outcome = RequestDetokenizer(smollm.tokenizer, ["<|im_end|>"], False, ()).step(ids, NONE)
        assert outcome == ("done", len(ids), True, NONE, "<|im_end|>")

    def test_emoji_and_cjk_stop(self, smollm):
        text = "数一数：一二三🎉四五"
        ids = smollm.tokenizer.encode(text, add_special_tokens=False).ids
        request = RequestDetokenizer(smollm.tokenizer, ["三🎉"], True, ())
        out = ""
        for i in ids:
            outcome = request.step([i], NONE)
            out += outcome.text
            assert "\ufffd" not in outcome.text
            if outcome.finished:
                break
        assert out == "数一数：一二" and outcome.matched_stop == "三🎉"
