"""Stop strings, property-based: random texts, random splits into pieces (and real tokenizations), random stop sets
whose strings start mid-token, overlap each other and contain each other.

The reference (`reference_cut`) is the rule of stop_strings.py stated on the whole text: the stop occurrence that
ends first wins, on a tie the one starting first; the output is the text before it, or up to its end when stops
are included. Properties: (a) streamed output equals the single-piece output, (b) both equal the reference, and
(c) every prefix emitted on the way is a prefix of the reference output, so nothing after the stop is ever sent
and, when stops are cut, not even the start of the stop that matched.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protos.tandem.internal.v1 import engine_pb2
from tokenizer_svc import IncrementalDecoder, RequestDetokenizer, StopStringMatcher

NONE = engine_pb2.ENGINE_FINISH_NONE
LENGTH = engine_pb2.ENGINE_FINISH_LENGTH

# Few characters, so that stops match often and overlap; emoji and CJK so that pieces hold multi-byte characters.
ALPHABET = "ab c\n🎉中"
SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKEN_SETTINGS = settings(max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def reference_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None, int]:
    """(output, matched stop or None, where the matched occurrence ends) for the whole text at once."""
    best = None  # (end, start, stop): the smallest end, then the smallest start
    for stop in stops:
        at = text.find(stop)  # a stop's first occurrence is also its earliest-ending one
        if at != -1 and (best is None or (at + len(stop), at) < best[:2]):
            best = (at + len(stop), at, stop)
    if best is None:
        return text, None, len(text)
    end, start, stop = best
    return (text[:end] if include else text[:start]), stop, end


def earliest_start_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The older rule: the earliest-starting occurrence, the shorter on a tie."""
    found = [(text.find(s), len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    at, n, stop = min(found)
    return (text[:at + n] if include else text[:at]), stop


def has_infix(stops: list[str]) -> bool:
    """Whether a stop occurs strictly inside another one (neither at its start nor at its end)."""
    return any(b != a and b in a[1:-1] for a in stops for b in stops)


@st.composite
def texts_and_stops(draw, alphabet=ALPHABET):
    text = draw(st.text(alphabet, max_size=40))
    stops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["substring", "overlap", "infix", "random"]))
        if kind != "random" and len(text) >= 2:
            i = draw(st.integers(0, len(text) - 2))
            j = draw(st.integers(i + 1, min(len(text), i + 6)))
            stops.append(text[i:j])
            if kind == "overlap" and j - i >= 2:  # a second stop starting inside the first and running past it
                k = draw(st.integers(i + 1, j - 1))
                stops.append(text[k:min(len(text), j + draw(st.integers(1, 3)))])
            elif kind == "infix" and j - i >= 3:  # a stop strictly inside another
                k = draw(st.integers(i + 1, j - 2))
                stops.append(text[k:draw(st.integers(k + 1, j - 1))])
        else:
            stops.append(draw(st.text(alphabet, min_size=1, max_size=5)))
    return text, stops


def split(draw, text: str, max_piece: int) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = draw(st.integers(1, max_piece))
        pieces.append(text[i:i + n])
        i += n
    return pieces


def run_matcher(stops, pieces, include):
    """(output, matched, [emitted text after each piece]), flushing when the pieces run out without a match."""
    matcher = StopStringMatcher(stops, include)
    emitted, prefixes, matched, seen = "", [], None, ""
    for piece in pieces:
        seen += piece
        out, matched = matcher.feed(piece)
        emitted += out
        prefixes.append(emitted)
        if matched is not None:
            break
        assert emitted + matcher.held == seen  # nothing lost: what is not emitted yet is held
    if matched is None:
        emitted += matcher.flush()
    return emitted, matched, prefixes


@SETTINGS
@given(st.data(), texts_and_stops(), st.booleans())
def test_matcher_streamed_equals_whole_equals_reference(data, text_stops, include):
    text, stops = text_stops
    pieces = split(data.draw, text, 5)
    expected, expected_stop, _ = reference_cut(text, stops, include)
    streamed, matched, prefixes = run_matcher(stops, pieces, include)
    whole, whole_matched, _ = run_matcher(stops, [text] if text else [], include)
    assert (streamed, matched) == (whole, whole_matched)                       # (a)
    assert (streamed, matched) == (expected, expected_stop)                    # (b)
    for prefix in prefixes:                                                    # (c)
        assert expected.startswith(prefix)
        if not include:
            assert not any(s in prefix for s in stops)
    if not has_infix(stops):  # where no stop lies inside another, the earliest-start rule agrees
        assert (streamed, matched) == earliest_start_cut(text, stops, include)


@SETTINGS
@given(texts_and_stops())
def test_char_by_char_equals_whole(text_stops):
    text, stops = text_stops
    for include in (False, True):
        assert run_matcher(stops, list(text), include)[:2] == reference_cut(text, stops, include)[:2]


# --- through RequestDetokenizer, on real tokenizations ---------------------------------------------------------

SEGMENTS = ["a", "b", "ab", " ", " the", "c", "\n", "🎉", "中文", "é", "<|im_end|>", "Paris", "."]


@pytest.fixture(scope="module", params=["smollm", "spm"])
def tok(request, smollm, spm):
    return (smollm if request.param == "smollm" else spm).tokenizer


def streamed_prefix_lengths(tokenizer, ids) -> list[int]:
    """len(text after k tokens) for k = 0..len(ids), with no stop strings (the text a stop is looked for in)."""
    decoder = IncrementalDecoder(tokenizer, (), skip_special_tokens=False)
    lengths, n = [0], 0
    for i in ids:
        n += len(decoder.push(i))
        lengths.append(n)
    lengths[-1] += len(decoder.flush())
    return lengths


@TOKEN_SETTINGS
@given(data=st.data(), include=st.booleans())
def test_detokenizer_stops_on_real_tokens(tok, data, include):
    text = "".join(data.draw(st.lists(st.sampled_from(SEGMENTS), max_size=14)))
    ids = tok.encode(text, add_special_tokens=False).ids
    full = tok.decode(ids, skip_special_tokens=False)  # the text the stops are looked for in
    if full:  # stops taken from the decoded text, so they start mid-token, and may overlap each other
        stops = []
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(full) - 1))
            stops.append(full[i:data.draw(st.integers(i + 1, min(len(full), i + 6)))])
        if data.draw(st.booleans()):  # one more, starting inside the first one's first occurrence
            first = stops[0]
            k = full.find(first) + len(first) // 2
            stops.append(full[k:k + data.draw(st.integers(1, 4))] or first)
    else:
        stops = [data.draw(st.text(ALPHABET, min_size=1, max_size=3))]
    expected, expected_stop, end = reference_cut(full, stops, include)
    lengths = streamed_prefix_lengths(tok, ids)
    assert lengths[-1] == len(full)

    request = RequestDetokenizer(tok, stops, False, (), include_stop_str_in_output=include)
    out, consumed, pos, outcome = "", 0, 0, None
    while True:
        chunk = ids[pos:pos + data.draw(st.integers(1, 4))]
        pos += len(chunk)
        outcome = request.step(chunk, NONE if pos < len(ids) else LENGTH)
        out += outcome.text
        consumed += outcome.consumed
        assert expected.startswith(out)                    # (c) on every step
        if outcome.finished:
            break
    assert out == expected                                 # (b), whatever the steps: so (a) too
    assert outcome.matched_stop == (expected_stop or "")
    if expected_stop is None:
        assert (consumed, outcome.finish) == (len(ids), LENGTH)
    else:
        # The ids end with the token whose text completed the stop: the first k with the stop's end in its text.
        assert consumed == next(k for k in range(len(lengths)) if lengths[k] >= end)
        assert outcome.finish == NONE
