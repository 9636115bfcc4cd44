"""Turning generated tokens into text: streaming detokenization and stop strings.

Stop strings are matched on text, not tokens, because a stop string can start or end in the
middle of a token. The filter holds back just enough trailing text to decide whether it is the
beginning of a stop string, so what it releases never has to be taken back.
"""

from __future__ import annotations


class StopStringFilter:
    """Releases text up to (and excluding) the first stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add text; return what is now safe to emit. After a match, returns "" forever."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out

    def flush(self) -> str:
        """The held-back text, at the end of generation (no stop string can complete now)."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        return out
