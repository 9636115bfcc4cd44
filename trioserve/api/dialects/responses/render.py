"""The Responses API renderer: neutral pieces to ``response.*`` events, or one ``response``.

One state machine builds the output items (``message`` with one ``output_text`` part,
``reasoning``, ``function_call``) as pieces arrive and emits the events OpenAI's stream has
for each step; a whole answer runs the same machine and keeps only the final object, so the
two can never disagree. Item ids are fixed when an item opens and are the same in every delta
and in the final ``response``. Every event carries ``sequence_number``, counting from 0.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from trioserve.engine.events import TokenDelta, Usage
from trioserve.output import sse
from trioserve.output.chunks import prediction_details
from trioserve.output.pieces import (
    ContentPiece,
    Piece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)
from trioserve.output.progress import PROGRESS_EVENT


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponsesRenderer:
    """One response. ``echo`` holds the request fields a ``response`` object repeats
    (instructions, tools, tool_choice, text, ...); ``on_complete`` gets the final object of a
    completed or incomplete response (for ``store``)."""

    opening_needs_prompt = False

    def __init__(
        self,
        *,
        model: str,
        response_id: str | None = None,
        echo: dict[str, Any] | None = None,
        tool_names: Callable[[str], tuple[str, str | None]] | None = None,
        on_complete: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.response_id = response_id or new_response_id()
        self.created_at = int(time.time())
        self.model = model
        self._echo = dict(echo or {})
        self._tool_name = tool_names or (lambda name: (name, None))
        self._on_complete = on_complete
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # items, in order
        self._open: dict[str, Any] | None = None  # the item receiving pieces now
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item
        self._reasoning_tokens = 0
        self.final: dict[str, Any] | None = None

    # -- the Renderer protocol ------------------------------------------------------------

    def opening(self, prompt_tokens: int = 0) -> list[bytes]:
        snapshot = self._response("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def progress(self, fields: dict[str, Any]) -> bytes:
        # A named event strict Responses clients skip (see docs/clients.md); its data is a
        # self-describing object with the progress fields, like every other event's.
        body = {k: v for k, v in fields.items() if v is not None}
        return self._event(PROGRESS_EVENT, response_id=self.response_id, **body)

    def keepalive(self) -> bytes | None:
        return None  # strict clients of this dialect take no keepalive events

    def content_start(self) -> list[bytes]:
        return []

    def pieces(self, pieces: Sequence[Piece], deltas: Sequence[TokenDelta]) -> list[bytes]:
        out: list[bytes] = []
        if pieces and all(isinstance(p, ReasoningPiece) for p in pieces):
            self._reasoning_tokens += len(deltas)
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                out += self._text(piece.text)
            elif isinstance(piece, ReasoningPiece):
                out += self._reasoning(piece.text)
            elif isinstance(piece, ToolCallStart):
                out += self._call_start(piece)
            elif isinstance(piece, ToolCallArguments):
                out += self._call_arguments(piece)
        return out

    def finish(self, reason: str, usage: Usage, stop_sequence: str | None = None) -> list[bytes]:
        out = self._close_open()
        if reason == "length":
            status, details, kind = "incomplete", {"reason": "max_output_tokens"}, "incomplete"
        else:
            status, details, kind = "completed", None, "completed"
        self.final = self._response(status, usage=usage, incomplete_details=details)
        if self._on_complete is not None:
            self._on_complete(self.final)
        return [*out, self._event(f"response.{kind}", response=self.final)]

    def error(self, message: str, code: str, error_type: str) -> list[bytes]:
        out = self._close_open()
        error = {"code": code, "message": message}
        self.final = self._response("failed", error=error)
        return [
            *out,
            self._event("error", code=code, message=message, param=None),
            self._event("response.failed", response=self.final),
        ]

    def whole(
        self,
        pieces: Sequence[Piece],
        deltas: Sequence[TokenDelta],
        reason: str,
        usage: Usage,
        stop_sequence: str | None = None,
    ) -> dict[str, Any]:
        self.pieces(pieces, ())
        self._reasoning_tokens = _reasoning_tokens(pieces, deltas)
        self.finish(reason, usage)
        assert self.final is not None
        return self.final

    # -- items ------------------------------------------------------------------------------

    def _text(self, text: str) -> list[bytes]:
        out = []
        item = self._open
        if item is None or item["type"] != "message":
            out += self._close_open()
            item = {
                "type": "message",
                "id": _item_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            out += self._add_item(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            out.append(self._part_event("response.content_part.added", item, part=dict(part)))
        part = item["content"][0]
        part["text"] += text
        out.append(self._part_event("response.output_text.delta", item, delta=text, logprobs=[]))
        return out

    def _reasoning(self, text: str) -> list[bytes]:
        out = []
        item = self._open
        if item is None or item["type"] != "reasoning":
            out += self._close_open()
            item = {
                "type": "reasoning",
                "id": _item_id("rs"),
                "status": "in_progress",
                "summary": [],
                "content": [],
            }
            out += self._add_item(item)
            part = {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            out.append(self._part_event("response.content_part.added", item, part=dict(part)))
        item["content"][0]["text"] += text
        out.append(self._part_event("response.reasoning_text.delta", item, delta=text))
        return out

    def _call_start(self, piece: ToolCallStart) -> list[bytes]:
        out = self._close_open()
        name, namespace = self._tool_name(piece.name)
        item = {
            "type": "function_call",
            "id": _item_id("fc"),
            "call_id": piece.id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        if namespace is not None:
            item["namespace"] = namespace
        self._calls[piece.index] = item
        return out + self._add_item(item)

    def _call_arguments(self, piece: ToolCallArguments) -> list[bytes]:
        item = self._calls.get(piece.index)
        if item is None or not piece.text:
            return []
        item["arguments"] += piece.text
        return [
            self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=self._index(item),
                delta=piece.text,
            )
        ]

    def _add_item(self, item: dict[str, Any]) -> list[bytes]:
        self._output.append(item)
        self._open = item
        return [
            self._event(
                "response.output_item.added", output_index=self._index(item), item=_copy(item)
            )
        ]

    def _close_open(self) -> list[bytes]:
        """Finish the item receiving pieces: its ``.done`` events, in OpenAI's order."""
        item, self._open = self._open, None
        if item is None:
            return []
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(
                self._part_event("response.output_text.done", item, text=part["text"], logprobs=[])
            )
            out.append(self._part_event("response.content_part.done", item, part=dict(part)))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            out.append(self._part_event("response.reasoning_text.done", item, text=part["text"]))
            out.append(self._part_event("response.content_part.done", item, part=dict(part)))
        else:
            if not item["arguments"]:
                item["arguments"] = "{}"
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=self._index(item),
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = "completed"
        out.append(
            self._event(
                "response.output_item.done", output_index=self._index(item), item=_copy(item)
            )
        )
        return out

    # -- framing ----------------------------------------------------------------------------

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, it in enumerate(self._output) if it is item)

    def _part_event(self, kind: str, item: dict[str, Any], **fields: Any) -> bytes:
        return self._event(
            kind, item_id=item["id"], output_index=self._index(item), content_index=0, **fields
        )

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse.event(kind, payload)

    def _response(
        self,
        status: str,
        *,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
        incomplete_details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [_copy(item) for item in self._output],
            "error": error,
            "incomplete_details": incomplete_details,
            "usage": _usage(usage, self._reasoning_tokens) if usage is not None else None,
            **self._echo,
        }


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def _usage(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": min(reasoning_tokens, usage.completion_tokens),
            **(prediction_details(usage) if usage.accepted_prediction_tokens is not None else {}),
        },
        "total_tokens": usage.total_tokens,
    }


def _reasoning_tokens(pieces: Sequence[Piece], deltas: Sequence[TokenDelta]) -> int:
    """For a whole answer: the tokens that were reasoning, by share of characters."""
    reasoning = sum(len(p.text) for p in pieces if isinstance(p, ReasoningPiece))
    total = sum(len(d.text) for d in deltas)
    return round(len(deltas) * reasoning / total) if total else 0
