"""Stop sequences, applied to the text as it is released (after the safety verdict that clears it).

The strategy's hold-back buffer decides *whether* text may be shown; this decides *how much*: the
released text is cut before the first stop sequence, and a tail that could still become one is
held back until the next piece tells (so a stop sequence split across tokens is still found and
never shown). Working on released text keeps the hold-back guarantee: nothing here ever shows
text that a safe verdict has not covered.
"""
from __future__ import annotations

from typing import Any

from .errors import ParameterError

MAX_STOPS = 4  # as OpenAI's API


def stop_list(stop: Any) -> list[str]:
    """A `stop` argument (None, a string, or a list of strings) as a list; ParameterError otherwise."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ParameterError(f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    if len(items) > MAX_STOPS or any(not s for s in items):
        raise ParameterError(f"stop takes at most {MAX_STOPS} non-empty strings, got {stop!r}", param="stop")
    return list(items)


class StopMatcher:
    """Feed released text; get back what may be shown. `hit` turns True at the first stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        buf = self.pending + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.pending = True, ""
            return buf[:min(found)]
        keep = 0
        for k in range(min(len(buf), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                keep = k
                break
        self.pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it did not become a stop sequence)."""
        out, self.pending = self.pending, ""
        return "" if self.hit else out
