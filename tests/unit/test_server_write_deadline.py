"""M8 in-process, without the model: Hypercorn (through ``server._hypercorn_serve``) streams to
a client that reads nothing, and the server is asked to shut down while its write is stuck.

With ``server.listeners``' write deadline the serve returns once the deadline has passed, even
though Hypercorn's graceful timeout has cancelled the connection well before (its write is
shielded). The control, with plain listeners, shows why the deadline exists: there the serve
waits for the client. A watchdog closes the client, so neither case can hang the test run.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.lowlevel
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app

from trioserve import server
from trioserve.net import WriteDeadlineListener

SEND_TIMEOUT_S = 2.0
GRACEFUL_TIMEOUT_S = 0.5  # Hypercorn cancels the connection long before the deadline
WATCHDOG_S = 6.0


class EndlessStream:
    """An ASGI app whose one response never ends; it notes since when a write is pending."""

    def __init__(self) -> None:
        self.write_pending_since: float | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            self.write_pending_since = trio.current_time()
            await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
            self.write_pending_since = None
            await trio.lowlevel.checkpoint()  # after a disconnect, send returns at once

    async def wait_stuck(self, for_s: float) -> None:
        while True:
            since = self.write_pending_since
            if since is not None and trio.current_time() - since > for_s:
                return
            await trio.sleep(0.05)


async def _shut_down_with_a_stalled_reader(send_timeout_s: float | None) -> tuple[float, bool]:
    """Seconds from the shutdown request to the serve's return, and whether the watchdog had
    to close the client for it to return."""
    hc = HypercornConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.graceful_timeout = GRACEFUL_TIMEOUT_S
    listeners = server.listeners(hc, send_timeout_s)
    plain = listeners[0].inner if isinstance(listeners[0], WriteDeadlineListener) else listeners[0]
    port = plain.socket.getsockname()[1]
    app = EndlessStream()
    stop = trio.Event()
    watchdog_fired = False
    took = float("nan")
    client = trio.socket.socket()
    client.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)

    async def serve(nursery: trio.Nursery) -> None:
        nonlocal took
        serve_app = wrap_app(app, hc.wsgi_max_body_size, "asgi")
        await server._hypercorn_serve(serve_app, hc, listeners, shutdown_trigger=stop.wait)
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()  # the watchdog

    async def watchdog() -> None:
        nonlocal watchdog_fired
        await trio.sleep(WATCHDOG_S)
        watchdog_fired = True
        client.close()  # unread data: the server's write fails with a reset

    with client:
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(serve, nursery)
            with trio.fail_after(10):  # nothing shielded yet: these waits can fail
                await client.connect(("127.0.0.1", port))
                await client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never read
                await app.wait_stuck(for_s=0.3)
            nursery.start_soon(watchdog)
            started = trio.current_time()
            stop.set()
    return took, watchdog_fired


async def test_shutdown_with_a_stalled_reader_ends_at_the_write_deadline(caplog):
    caplog.set_level(logging.WARNING, logger="trioserve")
    took, watchdog_fired = await _shut_down_with_a_stalled_reader(SEND_TIMEOUT_S)
    assert not watchdog_fired, f"the serve returned only when the client went ({took:.1f} s)"
    # The write was already stuck 0.3 s at the request; Hypercorn cancelled it at 0.5 s.
    assert GRACEFUL_TIMEOUT_S < took < SEND_TIMEOUT_S + 1
    assert "it accepted no data for 2 s (--send-timeout)" in caplog.text


async def test_without_the_deadline_hypercorn_waits_for_the_client():
    """If this fails, Hypercorn has learnt to end a stuck write itself (an upstream write
    timeout): trioserve.net and the copy of worker_serve may then go."""
    took, watchdog_fired = await _shut_down_with_a_stalled_reader(None)
    assert watchdog_fired, f"the serve returned after {took:.1f} s with the client still there"
    assert took == pytest.approx(WATCHDOG_S, abs=1)


async def test_listeners_wrap_only_with_a_finite_positive_send_timeout():
    for send_timeout_s, wrapped in [
        (30.0, True),
        (0.0, False),
        (None, False),
        (float("inf"), False),
    ]:
        hc = HypercornConfig()
        hc.bind = ["127.0.0.1:0"]
        (listener,) = server.listeners(hc, send_timeout_s)
        try:
            assert isinstance(listener, WriteDeadlineListener) is wrapped
        finally:
            await listener.aclose()
