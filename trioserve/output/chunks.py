"""OpenAI response and chunk dicts, built from engine values with no I/O.

One ``ChunkBuilder`` per request keeps ``id``, ``created`` and ``model`` identical across a
stream, and keeps the running text length that completion ``text_offset`` needs. Every payload it
makes is a valid chunk for strict clients: ``choices`` is always present (empty for usage and
progress), and logprobs are always finite JSON numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from trioserve.engine.events import TokenDelta, Usage
from trioserve.output.pieces import (
    ContentPiece,
    Piece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)

__all__ = ["LOGPROB_FLOOR", "ChunkBuilder", "error_payload", "usage_dict"]

#: What OpenAI reports for a vanishing probability; stands in for -inf, NaN or a missing value.
LOGPROB_FLOOR = -9999.0

_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completion": "text_completion"}
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


def error_payload(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body; also sent as an in-stream ``data:`` once headers are out."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_dict(usage: Usage) -> dict[str, Any]:
    out = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
    if usage.accepted_prediction_tokens is not None:  # the request had a prediction
        out["completion_tokens_details"] = prediction_details(usage)
    return out


def prediction_details(usage: Usage) -> dict[str, int]:
    """Predicted Outputs, in OpenAI's fields: the prediction's tokens the model accepted,
    and those it verified and rejected (computed for nothing). ``completion_tokens`` counts
    the answer's own tokens only."""
    return {
        "accepted_prediction_tokens": usage.accepted_prediction_tokens or 0,
        "rejected_prediction_tokens": usage.rejected_prediction_tokens or 0,
    }


def _lp(value: float | None) -> float:
    if value is None or not math.isfinite(value):
        return LOGPROB_FLOOR
    return value


def _token(d: TokenDelta) -> str:
    # The chosen token on its own when the engine gave it; else the text it added.
    return d.text if d.token_text is None else d.token_text


def _token_bytes(d: TokenDelta) -> list[int]:
    return list(d.text.encode("utf-8") if d.token_bytes is None else d.token_bytes)


def _chat_logprobs(deltas: Sequence[TokenDelta]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": _token(d),
                "logprob": _lp(d.logprob),
                "bytes": _token_bytes(d),
                "top_logprobs": [
                    {"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.bytes)}
                    for t in d.top_logprobs
                ],
            }
            for d in deltas
        ]
    }


def _piece_deltas(pieces: Sequence[Piece]) -> list[dict[str, Any]]:
    """Chat ``delta`` objects, merging runs of text and each call's consecutive arguments."""
    out: list[dict[str, Any]] = []
    for p in pieces:
        last = out[-1] if out else {}
        if isinstance(p, ContentPiece | ReasoningPiece):
            key = "content" if isinstance(p, ContentPiece) else "reasoning_content"
            if key in last:
                last[key] += p.text
            else:
                out.append({key: p.text})
        elif isinstance(p, ToolCallStart):
            function = {"name": p.name, "arguments": ""}
            call = {"index": p.index, "id": p.id, "type": "function", "function": function}
            out.append({"tool_calls": [call]})
        elif isinstance(p, ToolCallArguments):
            calls = last.get("tool_calls")
            if calls and calls[-1]["index"] == p.index:
                calls[-1]["function"]["arguments"] += p.text
            else:
                out.append({"tool_calls": [{"index": p.index, "function": {"arguments": p.text}}]})
    return out


def _completion_logprobs(deltas: Sequence[TokenDelta], offset: int) -> dict[str, Any]:
    offsets = []
    for d in deltas:
        offsets.append(offset)
        offset += len(d.text)
    return {
        "tokens": [_token(d) for d in deltas],
        "token_logprobs": [_lp(d.logprob) for d in deltas],
        "top_logprobs": [{t.token: _lp(t.logprob) for t in d.top_logprobs} for d in deltas],
        "text_offset": offsets,
    }


@dataclass
class ChunkBuilder:
    """Builds the payloads of one response (streamed or not).

    ``text_offset`` in completion logprobs counts characters of the generated text only (echo is
    not applied), so content chunks must be built in stream order.
    """

    id: str
    created: int
    model: str
    kind: Literal["chat", "completion"]
    _text_len: int = field(default=0, init=False, repr=False)

    @classmethod
    def new(cls, kind: Literal["chat", "completion"], model: str) -> ChunkBuilder:
        """A builder with a fresh ``chatcmpl-``/``cmpl-`` id and the current time."""
        return cls(f"{_ID_PREFIX[kind]}{uuid.uuid4().hex}", int(time.time()), model, kind)

    def _head(self, obj: str | None = None) -> dict[str, Any]:
        obj = obj or _CHUNK_OBJECT[self.kind]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, payload: Any, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        key = "delta" if self.kind == "chat" else "text"
        choice = {"index": 0, key: payload, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(), "choices": [choice]}

    def _logprobs(self, deltas: Sequence[TokenDelta], offset: int) -> dict[str, Any]:
        if self.kind == "chat":
            return _chat_logprobs(deltas)
        return _completion_logprobs(deltas, offset)

    def role_chunk(self) -> dict[str, Any]:
        """The opening chunk. For completions (no roles) it is a chunk with ``text: ""``."""
        if self.kind == "chat":
            return self._chunk({"role": "assistant", "content": ""}, None, None)
        return self._chunk("", None, None)

    def content_chunk(
        self, text: str, deltas: Sequence[TokenDelta] = (), logprobs: bool = False
    ) -> dict[str, Any]:
        """A chunk adding ``text``; ``deltas`` are the tokens behind it (used for logprobs)."""
        lp = self._logprobs(deltas, self._text_len) if logprobs else None
        self._text_len += len(text)
        return self._chunk({"content": text} if self.kind == "chat" else text, lp, None)

    def piece_chunks(
        self, pieces: Sequence[Piece], deltas: Sequence[TokenDelta] = (), logprobs: bool = False
    ) -> list[dict[str, Any]]:
        """Chat chunks for shaped output (content, ``reasoning_content``, ``tool_calls``).

        One chunk per run of same-kind pieces; the tokens' logprobs ride on the first chunk, or
        on an empty content chunk when the tokens added nothing visible yet.
        """
        out = _piece_deltas(pieces)
        if not out and logprobs:
            out = [{"content": ""}]
        return [
            self._chunk(delta, _chat_logprobs(deltas) if logprobs and i == 0 else None, None)
            for i, delta in enumerate(out)
        ]

    def finish_chunk(self, reason: str) -> dict[str, Any]:
        """The chunk carrying ``finish_reason``; strict clients need it before ``[DONE]``."""
        return self._chunk({} if self.kind == "chat" else "", None, reason)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The ``stream_options.include_usage`` chunk: ``choices: []`` plus ``usage``."""
        return {**self._head(), "choices": [], "usage": usage_dict(usage)}

    def progress_chunk(
        self,
        *,
        status: Literal["loading", "queued", "processing"],
        elapsed_seconds: float,
        n_past: int | None = None,
        n_prompt_tokens: int | None = None,
        fraction: float | None = None,
        queue_position: int | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Prefill progress as a valid chunk with ``choices: []``.

        Fields follow SwiftLM (``status``, ``n_past``...) and llama.cpp (``prompt_progress``), so
        clients that read either get it and clients that read neither see an empty chunk.
        While the model loads (``status: "loading"``) the prompt's figures are not known yet:
        only ``status``, ``model`` and ``elapsed_seconds``.
        """
        chunk: dict[str, Any] = {**self._head(), "choices": [], "status": status}
        if model is not None:
            chunk["model"] = model
        if n_past is None or n_prompt_tokens is None:
            chunk["elapsed_seconds"] = elapsed_seconds
            return chunk
        chunk.update(
            n_past=n_past,
            n_prompt_tokens=n_prompt_tokens,
            fraction=fraction,
            elapsed_seconds=elapsed_seconds,
        )
        if queue_position is not None:
            chunk["queue_position"] = queue_position
        chunk["prompt_progress"] = {
            "total": n_prompt_tokens,
            "processed": n_past,
            "cache": 0,
            "time_ms": round(elapsed_seconds * 1000),
        }
        return chunk

    def chat_response(
        self,
        text: str,
        finish_reason: str,
        usage: Usage,
        deltas: Sequence[TokenDelta] = (),
        logprobs: bool = False,
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        reasoning: str | None = None,
    ) -> dict[str, Any]:
        """The non-streamed ``chat.completion`` body; ``content`` is null when the message is
        only tool calls, as OpenAI sends it."""
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
            message["content"] = text or None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(deltas) if logprobs else None,
            "finish_reason": finish_reason,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage_dict(usage)}

    def completion_response(
        self,
        text: str,
        finish_reason: str,
        usage: Usage,
        deltas: Sequence[TokenDelta] = (),
        logprobs: bool = False,
    ) -> dict[str, Any]:
        """The non-streamed ``text_completion`` body."""
        choice = {
            "index": 0,
            "text": text,
            "logprobs": _completion_logprobs(deltas, 0) if logprobs else None,
            "finish_reason": finish_reason,
        }
        return {**self._head("text_completion"), "choices": [choice], "usage": usage_dict(usage)}
