"""What an output shaper splits generated text into: the parts of an assistant message.

Plain values shared by the tool-call parser, the reasoning splitter, the shaper and the chunk
builder, so none of them needs to know the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContentPiece:
    """Answer text (``delta.content``)."""

    text: str


@dataclass(frozen=True)
class ReasoningPiece:
    """Thinking text (``delta.reasoning_content``)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """The first delta of tool call ``index``: its id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """More of tool call ``index``'s ``function.arguments`` JSON text."""

    index: int
    text: str


Piece = ContentPiece | ReasoningPiece | ToolCallStart | ToolCallArguments


def hold_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``.

    Those must wait for more text before they can be released as ordinary text.
    """
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
