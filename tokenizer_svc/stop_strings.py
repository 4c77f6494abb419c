"""Stop-string matching on streamed text.

Which stop matches: the occurrence that is complete first in the text, i.e. the one that ends earliest; among
those ending at the same place, the one starting earliest (the longest). This is where generation token by token
would notice a stop, so the result does not depend on how the text is split into pieces: feeding a text in one
piece or character by character gives the same output and the same matched stop. (A rule "earliest start" would
not: with stops "abcd" and "bc", "abc" already holds "bc" while "abcd" is not complete yet.)

Invariant: the matcher keeps the tail of the text seen so far that is the longest proper prefix of some stop
string. Any stop string that can still complete starts inside that tail or in text not seen yet.

- Stops cut (default): the tail is held back, never emitted before the stream either matches or ends. Emitted
  text therefore never contains a stop string or the start of one that later completed.
- Stops included (`include_in_output`): everything is emitted at once; a match emits the text up to the end of
  the stop string. No held text is needed, as a match always ends in the newest piece (had it ended earlier, it
  would have matched then), so nothing emitted earlier lies after it.
"""
from __future__ import annotations

import re
from typing import Iterable


class StopStringMatcher:
    __slots__ = ("_stops", "_first_chars", "_any_first_char", "_max_tail", "_tail", "_include")

    def __init__(self, stops: Iterable[str], include_in_output: bool = False):
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # "" would match everywhere: ignored
        if not self._stops:
            raise ValueError("StopStringMatcher needs at least one non-empty stop string")
        self._first_chars = frozenset(s[0] for s in self._stops)
        # Text with none of these characters can neither hold a match nor begin one: the common case, one scan.
        self._any_first_char = re.compile("|".join(re.escape(c) for c in sorted(self._first_chars))).search
        self._max_tail = max(len(s) for s in self._stops) - 1
        self._include = include_in_output
        self._tail = ""  # the longest tail of the text seen that is a proper prefix of a stop string

    @property
    def held(self) -> str:
        """Text seen but not emitted yet (always "" when stop strings are included in the output)."""
        return "" if self._include else self._tail

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text now safe to emit, the matched stop string or None). After a match nothing more is emitted."""
        tail = self._tail
        if not tail and self._any_first_char(text) is None:
            return text, None
        buf = tail + text
        match, match_start, match_end = None, 0, len(buf) + 1
        for stop in self._stops:
            at = buf.find(stop)  # a stop's first occurrence is also the one that ends first
            if at != -1:
                end = at + len(stop)
                if end < match_end or (end == match_end and at < match_start):
                    match, match_start, match_end = stop, at, end
        if match is not None:
            self._tail = ""
            if self._include:
                return buf[len(tail):match_end], match  # the tail was emitted already
            return buf[:match_start], match
        cut = self._tail_start(buf)
        self._tail = buf[cut:]
        return (text, None) if self._include else (buf[:cut], None)

    def flush(self) -> str:
        """Releases the held text: the stream ended, so it can no longer become a stop string."""
        held, self._tail = self.held, ""
        return held

    def _tail_start(self, buf: str) -> int:
        """Where the longest tail of `buf` that is a proper prefix of a stop string begins (len(buf) if none)."""
        first_chars, stops = self._first_chars, self._stops
        for start in range(max(0, len(buf) - self._max_tail), len(buf)):
            if buf[start] in first_chars:
                tail = buf[start:]
                for stop in stops:
                    if stop.startswith(tail):
                        return start
        return len(buf)
