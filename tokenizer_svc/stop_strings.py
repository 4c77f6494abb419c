"""Stop-string matching on streamed text.

Invariant: text is held back only while the tail of the not-yet-emitted text is a proper prefix of some stop
string, so any stop string that can still appear starts inside the held text or in text not seen yet. Emitted
text therefore never contains a stop string or the start of one that later completed.

Among the stop strings complete in the text seen so far, the one starting earliest wins (the shorter on a tie).
A complete match is never delayed to wait for a longer stop string that starts earlier but is not complete.
"""
from __future__ import annotations

import re
from typing import Iterable


class StopStringMatcher:
    __slots__ = ("_stops", "_first_chars", "_any_first_char", "_max_held", "_held")

    def __init__(self, stops: Iterable[str]):
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # "" would match everywhere: ignored
        if not self._stops:
            raise ValueError("StopStringMatcher needs at least one non-empty stop string")
        self._first_chars = frozenset(s[0] for s in self._stops)
        # Text with none of these characters can neither hold a match nor begin one: the common case, one scan.
        self._any_first_char = re.compile("|".join(re.escape(c) for c in sorted(self._first_chars))).search
        self._max_held = max(len(s) for s in self._stops) - 1
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text now safe to emit, the matched stop string or None). After a match nothing more is emitted."""
        if not self._held and self._any_first_char(text) is None:
            return text, None
        buf = self._held + text
        match, match_at = None, len(buf)
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (at < match_at or (at == match_at and len(stop) < len(match))):
                match, match_at = stop, at
        if match is not None:
            self._held = ""
            return buf[:match_at], match
        cut = self._holdback_start(buf)
        self._held = buf[cut:]
        return buf[:cut], None

    def flush(self) -> str:
        """Releases the held text: the stream ended, so it can no longer become a stop string."""
        held, self._held = self._held, ""
        return held

    def _holdback_start(self, buf: str) -> int:
        """Where the longest tail of `buf` that is a proper prefix of a stop string begins (len(buf) if none)."""
        first_chars, stops = self._first_chars, self._stops
        for start in range(max(0, len(buf) - self._max_held), len(buf)):
            if buf[start] in first_chars:
                tail = buf[start:]
                for stop in stops:
                    if stop.startswith(tail):
                        return start
        return len(buf)
