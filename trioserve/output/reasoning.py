"""Splitting ``<think>…</think>`` reasoning from the answer, as text arrives.

Why: reasoning models write their thinking before the answer, and clients that know
(OpenCode, Continue, the openai SDK's extra fields) show ``reasoning_content`` apart from
``content``. Some templates open the think block in the prompt (the answer starts inside it,
with no ``<think>`` of its own), so the splitter can start in either state. Tails that could
be the start of a marker are held back, so a marker split across tokens never leaks; the
whitespace right after a marker is dropped (``<think>\\n``, ``</think>\\n\\n``).
"""

from __future__ import annotations

from dataclasses import dataclass

from trioserve.output.pieces import ContentPiece, ReasoningPiece, hold_back


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"


class ReasoningSplitter:
    """``feed`` text deltas, get ``ReasoningPiece``/``ContentPiece``s; ``finish`` at the end."""

    def __init__(self, fmt: ReasoningFormat | None = None, *, in_reasoning: bool = False) -> None:
        self._fmt = fmt or ReasoningFormat()
        self._thinking = in_reasoning
        self._buf = ""
        self._strip = in_reasoning  # drop whitespace at the start of the next segment

    def feed(self, text: str) -> list[ContentPiece | ReasoningPiece]:
        out: list[ContentPiece | ReasoningPiece] = []
        self._buf += text
        while True:
            marker = self._fmt.end if self._thinking else self._fmt.start
            idx = self._buf.find(marker)
            if idx < 0:
                keep = hold_back(self._buf, marker)
                self._emit(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            self._emit(self._buf[:idx], out)
            self._buf = self._buf[idx + len(marker) :]
            self._thinking = not self._thinking
            self._strip = True

    def finish(self) -> list[ContentPiece | ReasoningPiece]:
        out: list[ContentPiece | ReasoningPiece] = []
        self._emit(self._buf, out)
        self._buf = ""
        return out

    def _emit(self, text: str, out: list[ContentPiece | ReasoningPiece]) -> None:
        if self._strip:
            text = text.lstrip()
            if not text:
                return
            self._strip = False
        if text:
            out.append(ReasoningPiece(text) if self._thinking else ContentPiece(text))
