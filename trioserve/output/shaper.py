"""The per-request output shaper: generated text → content, reasoning and tool calls.

Why one object: the streamed path (``stream._generate``) and the non-streamed path
(``generation._complete``) must split text the same way, so both feed the same shaper — the
first chunk by chunk, the second all at once — and the non-streamed message is built from the
same pieces a stream would carry. Requests with no tools and a template without thinking get
no shaper at all, so their path stays exactly as it was.

Order: reasoning is split off first; only the answer is searched for tool calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trioserve.output.pieces import (
    ContentPiece,
    Piece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)
from trioserve.output.reasoning import ReasoningFormat, ReasoningSplitter
from trioserve.output.tool_calls import ToolCallFormat, ToolCallParser


@dataclass(frozen=True)
class ShapingSpec:
    """What to look for in one response; plain and immutable, built by the API layer."""

    tool_format: ToolCallFormat | None = None  # None: tool calls are not parsed
    tools: tuple[dict[str, Any], ...] = ()  # handed to family parsers that read schemas
    reasoning: ReasoningFormat | None = None  # None: no reasoning split
    starts_in_reasoning: bool = False  # the prompt left a think block open


class OutputShaper:
    """Feed text deltas; get pieces. ``finish`` flushes; ``finish_reason`` maps the engine's."""

    def __init__(self, spec: ShapingSpec) -> None:
        self._reasoning = (
            ReasoningSplitter(spec.reasoning, in_reasoning=spec.starts_in_reasoning)
            if spec.reasoning
            else None
        )
        self._tools = (
            ToolCallParser(spec.tool_format, list(spec.tools) or None) if spec.tool_format else None
        )

    @property
    def tool_calls(self) -> int:
        return self._tools.calls if self._tools else 0

    def feed(self, text: str) -> list[Piece]:
        if not text:
            return []
        split = self._reasoning.feed(text) if self._reasoning else [ContentPiece(text)]
        return self._parse_tools(split)

    def finish(self) -> list[Piece]:
        split = self._reasoning.finish() if self._reasoning else []
        out = self._parse_tools(split)
        if self._tools:
            out += self._tools.finish()
        return out

    def finish_reason(self, engine_reason: str) -> str:
        """``tool_calls`` when the answer ended normally after calling tools."""
        return "tool_calls" if engine_reason == "stop" and self.tool_calls else engine_reason

    def _parse_tools(self, pieces: list[Any]) -> list[Piece]:
        if not self._tools:
            return pieces
        out: list[Piece] = []
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                out += self._tools.feed(piece.text)
            else:
                out.append(piece)
        return out


def make_shaper(spec: ShapingSpec | None) -> OutputShaper | None:
    return OutputShaper(spec) if spec is not None else None


@dataclass
class ShapedMessage:
    """A whole assistant message gathered from pieces (the non-streamed response)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                self.content += piece.text
            elif isinstance(piece, ReasoningPiece):
                self.reasoning += piece.text
            elif isinstance(piece, ToolCallStart):
                self.tool_calls.append(
                    {
                        "id": piece.id,
                        "type": "function",
                        "function": {"name": piece.name, "arguments": ""},
                    }
                )
            elif isinstance(piece, ToolCallArguments):
                self.tool_calls[piece.index]["function"]["arguments"] += piece.text


def shape_text(spec: ShapingSpec, text: str, engine_reason: str) -> tuple[ShapedMessage, str]:
    """Shape a complete answer at once: the message and the finish reason."""
    shaper = OutputShaper(spec)
    message = ShapedMessage()
    message.add(shaper.feed(text))
    message.add(shaper.finish())
    return message, shaper.finish_reason(engine_reason)
