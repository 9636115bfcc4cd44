"""Server-sent events framing: objects in, bytes out, no I/O.

Kept apart from the response code (as h11 keeps framing apart from sockets) so the exact bytes a
strict client parses are tested in isolation. JSON is compact and UTF-8 (not ``\\uXXXX``
escaped); JSON escapes ``\\n`` and ``\\r`` inside strings, so a payload is always one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DONE", "comment", "data", "encode_json", "event"]

#: The sentinel OpenAI clients wait for after the last chunk.
DONE: bytes = b"data: [DONE]\n\n"

# SSE ends a line at CR, LF or CRLF; nothing else.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON for one payload.

    Raises:
        ValueError: on NaN or infinity, which are not JSON and break strict clients' parsers.
    """
    return json.dumps(dict(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def data(obj: Mapping[str, Any]) -> bytes:
    """One ``data:`` event carrying ``obj`` as JSON."""
    return b"data: " + encode_json(obj) + b"\n\n"


def event(name: str, obj: Mapping[str, Any]) -> bytes:
    """A named event. Note that OpenAI SDKs ignore the name and parse the data as a chunk.

    Raises:
        ValueError: if ``name`` is empty or holds a line break (it would end the field).
    """
    if not name or _LINE_BREAK.search(name):
        raise ValueError(f"invalid SSE event name: {name!r}")
    return b"event: " + name.encode("utf-8") + b"\n" + data(obj)


def comment(text: str) -> bytes:
    """A comment, which clients drop: a heartbeat. Each line of ``text`` gets its own ``:``."""
    lines = _LINE_BREAK.split(text)
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in lines) + b"\n"
