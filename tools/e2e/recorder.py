"""A loopback TCP relay that records what a client and trioserve say to each other.

The end-to-end checks need proof of what went over the wire, not only what the client printed:
which request carried the opt-in progress header, whether the stream the client read really
held ``event: prefill_progress`` events, and which ``chatcmpl-`` id each answer had (to find the
server's own log of that answer). The relay forwards bytes untouched and keeps a copy; h11 (which
Hypercorn already depends on) turns each connection's copy back into HTTP exchanges afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

from trioserve.testing import Event, parse_events


@dataclass
class Recording:
    """Both directions of one client connection, as raw bytes."""

    sent: bytearray = field(default_factory=bytearray)  # client -> server
    received: bytearray = field(default_factory=bytearray)  # server -> client


@dataclass
class Exchange:
    """One HTTP request and (as much as was sent of) its response."""

    method: str
    target: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    complete: bool = False  # the response reached its end

    def request_json(self) -> dict | None:
        try:
            value = json.loads(self.request_body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def sse_events(self) -> list[Event]:
        """The response body's SSE events (comment blocks dropped; a cut-off last event too)."""
        events = parse_events(self.response_body, errors="replace")
        return [event for event in events if not event.is_comment]

    def chunks(self) -> list[dict]:
        """Every JSON ``data:`` payload of the stream ([DONE] left out)."""
        out = []
        for event in self.sse_events():
            if event.data == "[DONE]":
                continue
            try:
                out.append(json.loads(event.data))
            except ValueError:
                out.append({"unparseable": event.data})
        return out


class Recorder:
    """Relays 127.0.0.1:<port> to 127.0.0.1:<upstream_port>; one Recording per connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.recordings: list[Recording] = []
        self.port: int | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``nursery.start(recorder.serve)`` returns once it listens."""
        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    async def _relay(self, client: trio.SocketStream) -> None:
        recording = Recording()
        self.recordings.append(recording)
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, recording.sent, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, client, recording.received, nursery.cancel_scope)

    def exchanges(self) -> list[Exchange]:
        """All HTTP exchanges seen, in connection order."""
        out: list[Exchange] = []
        for recording in self.recordings:
            out.extend(parse_exchanges(bytes(recording.sent), bytes(recording.received)))
        return out


async def _pump(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    copy: bytearray,
    scope: trio.CancelScope,
) -> None:
    """Copy one direction. An end of stream is passed on as a half-close; a broken
    connection on either side ends both directions."""
    try:
        async for data in source:
            copy.extend(data)
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()


def _headers(items: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in items}


def parse_exchanges(sent: bytes, received: bytes) -> list[Exchange]:
    """Rebuild the request/response pairs of one HTTP/1.1 connection from its two byte streams.

    Two h11 state machines play both ends: ``server`` reads the client's bytes, ``client`` reads
    the server's. Each parsed event is replayed into the other machine so both stay in step
    across keep-alive cycles.
    """
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    server.receive_data(sent)
    server.receive_data(b"")  # the copy is all there will be
    fed_response = False
    exchanges: list[Exchange] = []
    while True:
        exchange = _read_request(server, client)
        if exchange is None:
            return exchanges
        exchanges.append(exchange)
        if not fed_response:
            client.receive_data(received)
            client.receive_data(b"")
            fed_response = True
        if not _read_response(client, server, exchange):
            return exchanges
        if server.our_state is h11.DONE and server.their_state is h11.DONE:
            server.start_next_cycle()
            client.start_next_cycle()
        else:
            return exchanges


def _next(conn: h11.Connection):
    try:
        return conn.next_event()
    except h11.RemoteProtocolError:
        return None  # cut off mid-message


def _read_request(server: h11.Connection, client: h11.Connection) -> Exchange | None:
    event = _next(server)
    if not isinstance(event, h11.Request):
        return None
    client.send(event)
    exchange = Exchange(
        method=event.method.decode(),
        target=event.target.decode(),
        request_headers=_headers(event.headers),
        request_body=b"",
    )
    body = bytearray()
    while True:
        event = _next(server)
        if isinstance(event, h11.Data):
            body.extend(event.data)
            client.send(event)
        elif isinstance(event, h11.EndOfMessage):
            client.send(event)
            break
        else:
            break
    exchange.request_body = bytes(body)
    return exchange


def _read_response(client: h11.Connection, server: h11.Connection, exchange: Exchange) -> bool:
    """Fill in ``exchange``'s response; True when it ended cleanly."""
    body = bytearray()
    try:
        while True:
            event = _next(client)
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                exchange.status = event.status_code
                exchange.response_headers = _headers(event.headers)
                server.send(event)
            elif isinstance(event, h11.Data):
                body.extend(event.data)
                server.send(event)
            elif isinstance(event, h11.EndOfMessage):
                server.send(event)
                exchange.complete = True
                return True
            else:
                return False
    finally:
        exchange.response_body = bytes(body)
