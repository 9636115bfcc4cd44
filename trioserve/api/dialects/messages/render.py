"""The Anthropic Messages renderer: neutral pieces to ``message_start`` … ``message_stop``,
or one ``message`` object.

Content blocks open as pieces arrive (``text``, ``thinking``, ``tool_use`` with its input as
``input_json_delta`` fragments the way the model writes it) and close when the next kind
starts or the answer ends. A whole answer runs the same machine and keeps only the final
object. ``ping`` is the heartbeat while the prompt is read (the Anthropic SDKs skip it);
opt-in prefill progress is an ``event: prefill_progress`` after ``message_start``, which
the SDKs' stream helpers pass over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from trioserve.api.dialects.messages.errors import stream_error_body
from trioserve.engine.events import TokenDelta, Usage
from trioserve.output import sse
from trioserve.output.pieces import (
    ContentPiece,
    Piece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)
from trioserve.output.progress import PROGRESS_EVENT

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class MessagesRenderer:
    opening_needs_prompt = True  # message_start carries input_tokens

    def __init__(self, *, model: str, message_id: str | None = None) -> None:
        self.response_id = message_id or new_message_id()
        self.model = model
        self._blocks: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._json: dict[int, str] = {}  # tool-call index -> its input JSON text so far
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its block
        self._prompt_tokens = 0
        self.final: dict[str, Any] | None = None

    # -- the Renderer protocol ------------------------------------------------------------

    def opening(self, prompt_tokens: int) -> list[bytes]:
        self._prompt_tokens = prompt_tokens
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": 0,
            # The prefix cache's share is known once generation ends: see message_delta.
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }
        return [self._event("message_start", message=self._message(None, None, usage))]

    def progress(self, fields: dict[str, Any]) -> bytes:
        body = {k: v for k, v in fields.items() if v is not None}
        return self._event(PROGRESS_EVENT, message_id=self.response_id, **body)

    def keepalive(self) -> bytes | None:
        return self._event("ping")

    def content_start(self) -> list[bytes]:
        return []

    def pieces(self, pieces: Sequence[Piece], deltas: Sequence[TokenDelta]) -> list[bytes]:
        out: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                out += self._delta("text", {"type": "text_delta", "text": piece.text}, piece.text)
            elif isinstance(piece, ReasoningPiece):
                delta = {"type": "thinking_delta", "thinking": piece.text}
                out += self._delta("thinking", delta, piece.text)
            elif isinstance(piece, ToolCallStart):
                out += self._tool_start(piece)
            elif isinstance(piece, ToolCallArguments):
                out += self._tool_arguments(piece)
        return out

    def finish(self, reason: str, usage: Usage, stop_sequence: str | None = None) -> list[bytes]:
        out = self._close_open()
        stop_reason = "stop_sequence" if stop_sequence else STOP_REASONS.get(reason, "end_turn")
        final_usage = _usage(usage)
        self.final = self._message(stop_reason, stop_sequence, final_usage)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return [
            *out,
            self._event("message_delta", delta=delta, usage=final_usage),
            self._event("message_stop"),
        ]

    def error(self, message: str, code: str, error_type: str) -> list[bytes]:
        body = stream_error_body(message, code, error_type)
        return [*self._close_open(), sse.event("error", body)]

    def whole(
        self,
        pieces: Sequence[Piece],
        deltas: Sequence[TokenDelta],
        reason: str,
        usage: Usage,
        stop_sequence: str | None = None,
    ) -> dict[str, Any]:
        self.pieces(pieces, ())
        self.finish(reason, usage, stop_sequence)
        assert self.final is not None
        return self.final

    # -- blocks -----------------------------------------------------------------------------

    def _delta(self, kind: str, delta: dict[str, Any], text: str) -> list[bytes]:
        out: list[bytes] = []
        block = self._open
        if block is None or block["type"] != kind:
            out += self._close_open()
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {
                    "type": "thinking",
                    "thinking": "",
                    "signature": "",
                }
            )
            out += self._start(block)
        block["text" if kind == "text" else "thinking"] += text
        out.append(self._event("content_block_delta", index=self._index(block), delta=delta))
        return out

    def _tool_start(self, piece: ToolCallStart) -> list[bytes]:
        out = self._close_open()
        block = {"type": "tool_use", "id": _tool_use_id(piece.id), "name": piece.name, "input": {}}
        self._calls[piece.index] = block
        self._json[piece.index] = ""
        return out + self._start(block)

    def _tool_arguments(self, piece: ToolCallArguments) -> list[bytes]:
        block = self._calls.get(piece.index)
        if block is None or not piece.text:
            return []
        self._json[piece.index] += piece.text
        delta = {"type": "input_json_delta", "partial_json": piece.text}
        return [self._event("content_block_delta", index=self._index(block), delta=delta)]

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        self._blocks.append(block)
        self._open = block
        shown = dict(block)
        if block["type"] == "tool_use":
            shown["input"] = {}
        return [self._event("content_block_start", index=self._index(block), content_block=shown)]

    def _close_open(self) -> list[bytes]:
        block, self._open = self._open, None
        if block is None:
            return []
        out = []
        if block["type"] == "tool_use":
            index = next(i for i, b in self._calls.items() if b is block)
            block["input"] = _parsed_input(self._json.get(index, ""))
        elif block["type"] == "thinking":
            # Local reasoning has no signature; an empty one keeps the block's shape.
            delta = {"type": "signature_delta", "signature": ""}
            out.append(self._event("content_block_delta", index=self._index(block), delta=delta))
        out.append(self._event("content_block_stop", index=self._index(block)))
        return out

    # -- framing ----------------------------------------------------------------------------

    def _index(self, block: dict[str, Any]) -> int:
        return next(i for i, b in enumerate(self._blocks) if b is block)

    def _message(
        self, stop_reason: str | None, stop_sequence: str | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [json.loads(json.dumps(b)) for b in self._blocks],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        return sse.event(kind, {"type": kind, **fields})


def _usage(usage: Usage) -> dict[str, Any]:
    # Anthropic counts cached prompt tokens apart from input_tokens.
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _parsed_input(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}
