"""Incremental tool-call parsing: generated text in, content and tool-call deltas out.

Why incremental: agent clients show a call as it is written, and OpenAI (and vLLM) stream
``function.arguments`` in pieces. So the parser finds the call markup (``<tool_call>`` ...
``</tool_call>`` by default, Hermes/Qwen style) while text arrives token by token, holds back
any tail that could be the start of a marker (so no markup leaks into content, even when a
marker is split across tokens), and for JSON calls scans the body as it grows: once the
top-level ``"name"`` is known it emits the call's start, then streams the raw text of the
``"arguments"`` value as it is generated.

Model families whose calls are not JSON (Qwen3-Coder XML, pythonic, Mistral...) are parsed
with mlx-lm's parser for the family when their end marker arrives, and streamed as one
arguments delta. A call that cannot be parsed and has not started yet comes back as content,
verbatim: the client sees what the model wrote rather than losing it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trioserve.output.pieces import (
    ContentPiece,
    Piece,
    ToolCallArguments,
    ToolCallStart,
    hold_back,
)

log = logging.getLogger(__name__)

DEFAULT_START = "<tool_call>"
DEFAULT_END = "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")

# mlx-lm's per-family parser: (call text, tools) -> {"name", "arguments"} or a list of those.
FamilyParser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family marks tool calls. ``parse`` None means JSON bodies (streamed)."""

    start: str = DEFAULT_START
    end: str = DEFAULT_END
    parse: FamilyParser | None = None
    family: str = "hermes"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class JsonCallScanner:
    """Scans one call's JSON body as it arrives, without waiting for it to be complete.

    It tracks strings and nesting only, which is enough to find the top-level ``"name"``
    string and the span of the ``"arguments"`` value. ``invalid`` means the body is not a JSON
    object it can follow; the value text is never validated here.
    """

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # characters scanned
        self.name: str | None = None
        self.args_start = -1
        self.args_end = -1  # -1 while the arguments value is open
        self.args_kind = ""  # "str" | "nest" | "prim"
        self.closed = False  # the top-level object ended at ``self.pos``
        self.invalid = False
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._str_start = 0
        self._phase = "key"  # at depth 1: key, colon, value, in_value, after
        self._key: str | None = None
        self._value_start = -1
        self._kind = ""

    @property
    def in_string(self) -> bool:
        return self._in_str

    @property
    def done(self) -> bool:
        return self.closed or self.invalid

    def advance(self, text: str, limit: int) -> None:
        """Scan ``text`` (an extension of what was seen before) up to index ``limit``."""
        self.text = text
        while self.pos < limit and not self.done:
            self._step(text[self.pos])
            self.pos += 1

    def arguments_so_far(self) -> str:
        """The raw text of the arguments value scanned so far ("" before it starts)."""
        if self.args_start < 0:
            return ""
        end = self.args_end if self.args_end >= 0 else self.pos
        return self.text[self.args_start : end]

    def _step(self, c: str) -> None:
        if self._in_str:
            if self._esc:
                self._esc = False
            elif c == "\\":
                self._esc = True
            elif c == '"':
                self._in_str = False
                if self._depth == 1:
                    self._string_end(self.pos + 1)
            return
        if c.isspace():
            return
        if self._depth == 0:
            if c == "{":
                self._depth = 1
            else:
                self.invalid = True
        elif self._depth == 1:
            self._top_level(c)
        elif c == '"':
            self._in_str = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 1:
                self._value_end(self.pos + 1)

    def _top_level(self, c: str) -> None:
        phase = self._phase
        if phase == "key":
            if c == '"':
                self._in_str, self._str_start = True, self.pos
            elif c == "}":
                self._close()
            else:
                self.invalid = True
        elif phase == "colon":
            if c == ":":
                self._phase = "value"
            else:
                self.invalid = True
        elif phase == "value":
            self._value_start, self._phase = self.pos, "in_value"
            if c == '"':
                self._kind, self._in_str, self._str_start = "str", True, self.pos
            elif c in "{[":
                self._kind, self._depth = "nest", 2
            else:
                self._kind = "prim"
            if self._key in ARGUMENT_KEYS and self.args_start < 0:
                self.args_start, self.args_kind = self.pos, self._kind
        elif phase == "in_value":  # only a primitive is still open here
            if c == ",":
                self._value_end(self.pos)
                self._phase = "key"
            elif c == "}":
                self._value_end(self.pos)
                self._close()
        elif c == ",":  # phase "after"
            self._phase = "key"
        elif c == "}":
            self._close()
        else:
            self.invalid = True

    def _string_end(self, end: int) -> None:
        raw = self.text[self._str_start : end]
        if self._phase == "key":
            try:
                self._key = json.loads(raw)
            except ValueError:
                self.invalid = True
                return
            self._phase = "colon"
        elif self._phase == "in_value":
            self._value_end(end)

    def _value_end(self, end: int) -> None:
        raw = self.text[self._value_start : end].rstrip()
        if self._key == "name" and self._kind == "str" and self.name is None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if isinstance(value, str) and value:
                self.name = value
        if self._value_start == self.args_start:
            self.args_end = self._value_start + len(raw)
        self._phase = "after"

    def _close(self) -> None:
        self._depth = 0
        self.closed = True


class ToolCallParser:
    """Splits one response's text into ``ContentPiece``s and tool-call pieces.

    ``feed`` takes text deltas in order; ``finish`` releases what is held back at the end.
    Whitespace next to a tool call is not content (models put newlines between calls).
    """

    def __init__(self, fmt: ToolCallFormat | None = None, tools: Any = None) -> None:
        self._fmt = fmt or ToolCallFormat()
        self._tools = tools
        self._buf = ""  # outside a call: unreleased text; inside: the call's body
        self._inside = False
        self._held_ws = ""  # trailing whitespace of the content, released with what follows
        self.calls = 0  # tool calls started
        self._scan: JsonCallScanner | None = None
        self._search_from = 0
        self._current: tuple[int, str] | None = None  # (index, id) of the open call, once named
        self._ws_before = ""  # the whitespace that came just before the open call
        self._sent_args = 0

    # -- public -------------------------------------------------------------------------

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self._buf += text
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        """End of generation: a call without its end marker is closed as it stands."""
        out: list[Piece] = []
        if self._inside:
            self._close_call(self._buf, out, ended=False)
        else:
            self._content(self._buf, out)
        self._buf = ""
        if self._held_ws and not self.calls:
            out.append(ContentPiece(self._held_ws))
        self._held_ws = ""
        return out

    # -- outside and inside a call --------------------------------------------------------

    def _step(self, out: list[Piece]) -> bool:
        """Consume what the buffer allows; True when the state changed and may go on."""
        fmt = self._fmt
        if not self._inside:
            idx = self._buf.find(fmt.start)
            if idx < 0:
                keep = hold_back(self._buf, fmt.start)
                self._content(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return False
            self._content(self._buf[:idx], out)
            self._buf = self._buf[idx + len(fmt.start) :]
            self._open_call()
            return True
        if not fmt.end:  # this family's calls run to the end of the answer
            return False
        idx = self._find_end()
        self._stream_json(out)
        if idx < 0:
            return False
        body, self._buf = self._buf[:idx], self._buf[idx + len(fmt.end) :]
        self._close_call(body, out, ended=True)
        return True

    def _find_end(self) -> int:
        """Where the end marker is (-1: not yet), skipping any inside a JSON string.

        Scans the body up to there, so ``_stream_json`` can send what is now known."""
        end = self._fmt.end
        scan = self._scan
        while True:
            idx = self._buf.find(end, self._search_from)
            if scan is None:
                return idx
            limit = idx if idx >= 0 else len(self._buf) - hold_back(self._buf, end)
            scan.advance(self._buf, limit)
            if idx >= 0 and scan.in_string and not scan.done:
                self._search_from = idx + 1  # "</tool_call>" inside a string is just text
                scan.advance(self._buf, idx + 1)
                continue
            return idx

    def _open_call(self) -> None:
        # Whitespace before a call is not content (kept in case the call turns out not to be).
        self._ws_before, self._held_ws = self._held_ws, ""
        self._inside = True
        self._search_from = 0
        self._current = None
        self._sent_args = 0
        self._scan = JsonCallScanner() if self._fmt.parse is None else None

    def _close_call(self, body: str, out: list[Piece], *, ended: bool) -> None:
        self._inside = False
        if self._scan is not None:
            self._scan.advance(body, len(body))
            self._close_json(body, out, ended=ended)
        else:
            self._close_family(body, out, ended=ended)
        self._scan = None

    # -- JSON bodies, streamed ------------------------------------------------------------

    def _stream_json(self, out: list[Piece]) -> None:
        scan = self._scan
        if scan is None:
            return
        if self._current is None and scan.name is not None:
            self._current = (self.calls, new_call_id())
            self.calls += 1
            out.append(ToolCallStart(self._current[0], self._current[1], scan.name))
        if self._current is None or scan.args_kind not in ("nest", ""):
            return  # a string or bare value is sent whole when it ends
        text = scan.arguments_so_far()
        if len(text) > self._sent_args:
            out.append(ToolCallArguments(self._current[0], text[self._sent_args :]))
            self._sent_args = len(text)

    def _close_json(self, body: str, out: list[Piece], *, ended: bool) -> None:
        scan = self._scan
        assert scan is not None
        self._stream_json(out)
        if self._current is None:  # never named: not a tool call we can return
            self._unparseable(body, out, ended=ended)
            return
        index = self._current[0]
        if scan.args_start < 0:
            out.append(ToolCallArguments(index, "{}"))
        elif scan.args_kind != "nest" and scan.args_end >= 0:
            raw = scan.text[scan.args_start : scan.args_end]
            out.append(ToolCallArguments(index, _decoded_arguments(raw, scan.args_kind)))
        elif scan.args_kind != "nest":
            out.append(ToolCallArguments(index, scan.arguments_so_far()))
        if scan.closed:
            rest = body[scan.pos :].strip()
            if rest:  # text after the JSON inside the markup: keep it as content
                self._content(rest, out, force=True)
        self._current = None

    # -- other families, parsed whole ------------------------------------------------------

    def _close_family(self, body: str, out: list[Piece], *, ended: bool) -> None:
        parse = self._fmt.parse
        assert parse is not None
        try:
            parsed = parse(body, self._tools)
        except Exception as exc:  # family parsers raise many types on malformed text
            parsed = None
            # The exception may quote the model's text: only its type above debug level.
            log.warning("tool call parser %s failed: %s", self._fmt.family, type(exc).__name__)
            log.debug("tool call parser %s failed: %r", self._fmt.family, exc)
        calls = parsed if isinstance(parsed, list) else [parsed]
        good = [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
        if not good:
            self._unparseable(body, out, ended=ended)
            return
        for call in good:
            index = self.calls
            self.calls += 1
            out.append(ToolCallStart(index, new_call_id(), call["name"]))
            args = call.get("arguments", {})
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            out.append(ToolCallArguments(index, text))

    def _unparseable(self, body: str, out: list[Piece], *, ended: bool) -> None:
        """A complete but malformed call comes back as content, verbatim; one cut off by the
        end of generation (``max_tokens``) before it had a name is dropped."""
        if not ended:
            # What the model wrote is logged at debug level only; above it, its length.
            log.info("dropped a tool call cut off before its name (%d characters)", len(body))
            log.debug("dropped tool call: %r", body[:200])
            return
        log.warning("unparseable tool call returned as content (%d characters)", len(body))
        log.debug("unparseable tool call: %r", body[:200])
        markup = self._ws_before + self._fmt.start + body + self._fmt.end
        self._content(markup, out, force=True)

    # -- content ----------------------------------------------------------------------------

    def _content(self, text: str, out: list[Piece], *, force: bool = False) -> None:
        text, self._held_ws = self._held_ws + text, ""
        if not force:  # trailing whitespace waits: it is dropped if a call comes next
            body = text.rstrip()
            text, self._held_ws = body, text[len(body) :]
        if text:
            out.append(ContentPiece(text))


def _decoded_arguments(raw: str, kind: str) -> str:
    """A string-valued arguments field holds JSON text itself: unwrap it."""
    if kind == "str":
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        return value if isinstance(value, str) else raw
    return raw
