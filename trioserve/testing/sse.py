"""Reading server-sent events back: the client half of :mod:`trioserve.output.sse`.

One parser for the tests and the tools, whether they hold a whole body or read a stream as it
arrives. Sans-IO, like the framing it reads: text or bytes in, :class:`Event` objects out, no
sockets, so the same code checks a recorded byte string and a live ``httpx`` stream.

It follows the WHATWG rules a browser's ``EventSource`` applies: a line ends at CRLF, LF or CR
(also when a CRLF is split between two reads); ``field: value`` loses one space after the
colon; ``data`` lines of one event are joined with ``\\n``; a blank line ends the event; an
event still open when the input ends is not an event. Two differences, both for tests:

- a block that holds only comments (a heartbeat such as ``: keepalive``) comes out too, as an
  event with ``data=None``; the comments of any block are kept in ``Event.comments``;
- ``id`` and ``retry`` are ignored (the server never sends them).

Whole bodies::

    events = parse_events(raw)            # str or bytes
    assert events[-1].is_done
    chunks = data_objects(raw)            # the JSON of every data event but [DONE]

A stream, event by event, as it arrives (``async for`` works the same way with ``feed``)::

    parser = SSEParser()
    async for text in response.aiter_text():
        for event in parser.feed(text):
            ...

    for event in iter_events(response.iter_text()):   # synchronous httpx
        ...
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["DONE", "Event", "SSEParser", "data_objects", "iter_events", "parse_events"]

#: The data of the sentinel event OpenAI clients wait for after the last chunk.
DONE = "[DONE]"

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One SSE event, or one block of comments.

    Attributes:
        name: the ``event:`` field; ``None`` for an unnamed (``message``) event.
        data: the ``data:`` lines joined with ``\\n``; ``None`` for a block of comments only.
        comments: the text of each comment line in the block (after ``:`` and one space).
    """

    name: str | None
    data: str | None
    comments: tuple[str, ...] = ()

    @property
    def is_comment(self) -> bool:
        """A block without data: a heartbeat, which clients drop."""
        return self.data is None

    @property
    def is_done(self) -> bool:
        """The ``data: [DONE]`` sentinel."""
        return self.data == DONE

    def json(self) -> Any:
        """The data, parsed as JSON.

        Raises:
            ValueError: for a comment block or ``[DONE]`` (no JSON there), or invalid JSON.
        """
        if self.data is None or self.is_done:
            raise ValueError(f"no JSON in this event: {self!r}")
        return json.loads(self.data)


class SSEParser:
    """An incremental parser: :meth:`feed` it what arrives, get back the events it completes.

    Args:
        errors: how bytes that are not UTF-8 are decoded (``"strict"`` raises; a recorder of
            cut connections may want ``"replace"``).
    """

    def __init__(self, *, errors: str = "strict") -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._buffer = ""  # text after the last complete line
        self._started = False
        self._name: str | None = None
        self._data: list[str] = []
        self._comments: list[str] = []

    @property
    def pending(self) -> bool:
        """Whether input arrived that is not part of a complete event yet."""
        return bool(self._buffer or self._name is not None or self._data or self._comments)

    def feed(self, chunk: str | bytes) -> list[Event]:
        """Add the next piece of the stream; return the events it completed, in order."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if not self._started and text:
            text = text.removeprefix("\ufeff")  # a byte-order mark may open the stream
            self._started = True
        buffer = self._buffer + text
        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == "\r" and match.end() == len(buffer):
                break  # maybe the first half of a CRLF: wait for the next piece
            event = self._line(buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[Event]:
        """End of input: a trailing CR still ends its line; an unfinished event is dropped
        (see :attr:`pending`, read before closing, to tell whether there was one)."""
        events = self.feed(self._decoder.decode(b"", final=True))
        if self._buffer.endswith("\r"):
            event = self._line(self._buffer[:-1])
            self._buffer = ""
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self._comments.append(line[1:].removeprefix(" "))
            return None
        field, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None  # id, retry and unknown fields are ignored

    def _dispatch(self) -> Event | None:
        name, data, comments = self._name, self._data, self._comments
        self._name, self._data, self._comments = None, [], []
        if data:
            return Event(name, "\n".join(data), tuple(comments))
        if comments:
            return Event(None, None, tuple(comments))
        return None  # a blank line, or an event name without data: nothing to dispatch


def parse_events(raw: str | bytes, *, errors: str = "strict") -> list[Event]:
    """Every complete event of a whole SSE body, comment blocks included."""
    parser = SSEParser(errors=errors)
    return parser.feed(raw) + parser.close()


def iter_events(chunks: Iterable[str | bytes], *, errors: str = "strict") -> Iterator[Event]:
    """The events of a stream read piece by piece, e.g. ``response.iter_text()``."""
    parser = SSEParser(errors=errors)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


def data_objects(raw: str | bytes) -> list[Any]:
    """The JSON of every data event of a body, named events included, ``[DONE]`` left out."""
    return [e.json() for e in parse_events(raw) if not e.is_comment and not e.is_done]
