"""Connection streams with a write deadline, so a client that stops reading cannot pin a task.

Why this exists: Hypercorn writes every frame with ``send_all`` inside
``CancelScope(shield=True)`` (``hypercorn/trio/tcp_server.py``, ``protocol_send``), and a
connection's socket is closed only after all of its tasks have ended. A client that keeps its
socket open but reads nothing therefore blocks that write for as long as it likes: neither the
request's own timeouts nor Hypercorn's ``graceful_timeout`` can cancel it, so the connection
(and, at shutdown, the whole process) waits for the client. Hypercorn has no write timeout of
its own (0.18), and Linux's ``TCP_USER_TIMEOUT`` exists neither on macOS nor under the plain
``hypercorn`` command.

The mechanism: a cancel scope opened *inside* a shielded scope still fires, because the shield
only blocks cancellation coming from outside it. ``WriteDeadlineStream.send_all`` runs each
piece of the write under its own ``trio.move_on_after(timeout_s)``; when that expires it
aborts the connection (an RST; the peer is dead to us) and raises ``trio.BrokenResourceError``,
which Hypercorn already treats as "the client went away". The reader task, blocked in
``receive_some`` on the same socket, then gets ``ClosedResourceError`` and the connection's tasks
unwind normally.

What the deadline means: the client must accept ``CHUNK_BYTES`` within ``timeout_s``. The
deadline is per chunk, not per response, so a healthy but slow client (any that takes 16 KiB
in 30 s, i.e. ~0.5 KB/s at the default) is never cut, however long its answer; a client that
makes no progress for that long is treated as dead. SSE frames are far smaller than a chunk,
so a streamed answer gets one deadline per frame.

Pure Trio: nothing here knows about Hypercorn, so it is tested on in-memory streams
(``tests/unit/test_net.py``). ``trioserve.server`` wraps the listeners it hands to Hypercorn.
"""

from __future__ import annotations

import logging
import math
import socket
import struct

import trio

log = logging.getLogger("trioserve")

# The most a client must accept within one deadline (see the docstring).
CHUNK_BYTES = 16 * 1024


class WriteDeadlineStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose writes give up after ``timeout_s`` without progress.

    Exposes ``socket`` as ``SocketStream`` does (Hypercorn reads the peer address from it);
    defines no ``do_handshake``, so Hypercorn takes it for a plain TCP stream. ``inner`` may be
    any ``HalfCloseableStream`` (tests pass in-memory ones); with a real socket the abort is an
    RST instead of a FIN.
    """

    def __init__(self, inner: trio.abc.HalfCloseableStream, timeout_s: float) -> None:
        self.inner = inner
        self.timeout_s = timeout_s
        self.aborted = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.inner.socket  # type: ignore[attr-defined]  # only with a SocketStream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        offset = 0
        while True:  # at least once: send_all(b"") is still a checkpoint and an error check
            chunk = view[offset : offset + CHUNK_BYTES]
            # Opened here, inside whatever shield the caller holds, so it fires regardless.
            with trio.move_on_after(self.timeout_s) as deadline:
                await self.inner.send_all(chunk)
            if deadline.cancelled_caught:
                await self._abort()
                raise trio.BrokenResourceError(
                    f"the client accepted no data for {self.timeout_s:g} s"
                )
            offset += len(chunk)
            if offset >= len(view):
                return

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _abort(self) -> None:
        self.aborted = True
        peer = "a client"
        sock = getattr(self.inner, "socket", None)
        if sock is not None:
            try:
                peer = _format_peer(sock.getpeername())
                # Linger 0: close() sends an RST and drops what the kernel still holds for
                # this client, instead of retrying it to a peer that is not reading.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already reset by the peer: closing is all that is left
        log.warning(
            "closing the connection of %s: it accepted no data for %g s (--send-timeout)",
            peer,
            self.timeout_s,
        )
        # Closes at once even if cancelled; a receive_some blocked on the same socket wakes
        # with ClosedResourceError.
        await trio.aclose_forcefully(self.inner)


class WriteDeadlineListener(trio.abc.Listener[WriteDeadlineStream]):
    """Wraps every stream ``inner`` accepts in a ``WriteDeadlineStream``."""

    def __init__(self, inner: trio.abc.Listener[trio.SocketStream], timeout_s: float) -> None:
        if not timeout_s > 0 or math.isinf(timeout_s):
            raise ValueError(f"a write deadline must be a positive number of seconds: {timeout_s}")
        self.inner = inner
        self.timeout_s = timeout_s

    async def accept(self) -> WriteDeadlineStream:
        return WriteDeadlineStream(await self.inner.accept(), self.timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "a client"
