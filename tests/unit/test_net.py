"""The write deadline of trioserve.net, on in-memory and loopback streams: no server, no model.

What matters is the shielded case: Hypercorn writes under ``CancelScope(shield=True)``, so only
a deadline opened inside the write can end it. For the same reason ``fail_after`` cannot bound
these tests: where the deadline were broken, the shielded write would ignore it. Each test
instead has a watchdog that closes the far end (which ends any write) and so turns a hang into
a failed assertion.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

from trioserve.net import CHUNK_BYTES, WriteDeadlineListener, WriteDeadlineStream

WATCHDOG_S = 30


async def _watchdog(close_far_end: Callable[[], object]) -> None:
    await trio.sleep(WATCHDOG_S)
    result = close_far_end()
    if hasattr(result, "__await__"):
        await result


async def test_a_shielded_write_to_a_reader_that_reads_nothing_gives_up_at_the_deadline(
    autojump_clock,
):
    sender, never_read = trio.testing.lockstep_stream_pair()
    stream = WriteDeadlineStream(sender, timeout_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watchdog, never_read.aclose)
        started = trio.current_time()
        with trio.CancelScope(shield=True), pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"data: frame\n\n")
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert stream.aborted, "the write ended only because the watchdog closed the reader"
    assert took == pytest.approx(5)
    with pytest.raises(trio.ClosedResourceError):  # closed: later writes fail at once
        await stream.send_all(b"more")


async def test_the_deadline_still_fires_after_the_connection_was_cancelled_around_the_shield(
    autojump_clock,
):
    """Hypercorn's graceful_timeout cancels the connection's nursery; its shielded write
    goes on, and only the deadline inside it ends the write. The cancel then takes over."""
    sender, never_read = trio.testing.lockstep_stream_pair()
    stream = WriteDeadlineStream(sender, timeout_s=5)
    ended: list[type[BaseException]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watchdog, never_read.aclose)
        with trio.CancelScope() as connection:

            async def graceful_timeout() -> None:
                await trio.sleep(1)
                connection.cancel()

            nursery.start_soon(graceful_timeout)
            started = trio.current_time()
            try:
                with trio.CancelScope(shield=True):
                    await stream.send_all(b"data: frame\n\n")
            except trio.BrokenResourceError as exc:
                ended.append(type(exc))
            took = trio.current_time() - started
            await trio.lowlevel.checkpoint()  # where the connection's cancel lands
            ended.append(object)  # not reached
        nursery.cancel_scope.cancel()
    assert connection.cancelled_caught
    assert ended == [trio.BrokenResourceError]
    assert stream.aborted
    assert took == pytest.approx(5)  # the deadline, not the cancel at 1 s


async def test_a_slow_but_steady_reader_is_never_cut(autojump_clock):
    sender, receiver = trio.testing.lockstep_stream_pair()
    stream = WriteDeadlineStream(sender, timeout_s=5)
    payload = bytes(range(256)) * (4 * CHUNK_BYTES // 256)  # four deadlines' worth
    received = bytearray()

    async def read_a_chunk_every_4_s() -> None:
        while len(received) < len(payload):
            await trio.sleep(4)
            received.extend(await receiver.receive_some(CHUNK_BYTES))

    started = trio.current_time()
    with trio.fail_after(WATCHDOG_S):  # nothing here can block a cancel for long
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_a_chunk_every_4_s)
            with trio.CancelScope(shield=True):
                await stream.send_all(payload)
    assert bytes(received) == payload
    assert trio.current_time() - started >= 16  # far longer than one deadline, yet not cut
    assert not stream.aborted


async def test_a_cancel_from_outside_an_unshielded_write_is_not_swallowed(autojump_clock):
    sender, _never_read = trio.testing.lockstep_stream_pair()
    stream = WriteDeadlineStream(sender, timeout_s=5)
    with trio.move_on_after(1) as outer:
        await stream.send_all(b"x")
    assert outer.cancelled_caught
    assert not stream.aborted  # the caller's cancel, not the deadline


async def test_on_a_real_socket_the_stalled_connection_is_reset_and_its_reader_woken():
    """What Hypercorn's connection sees: the shielded writer gets BrokenResourceError, the
    reader task blocked on the same socket gets ClosedResourceError, the client an RST."""
    listener = WriteDeadlineListener(
        (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0], timeout_s=0.5
    )
    port = listener.inner.socket.getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))  # the backlog accepts it; never read from it
    outcome: dict[str, type[BaseException]] = {}
    reader_done = trio.Event()
    try:
        async with listener:
            with trio.fail_after(5):
                stream = await listener.accept()
            assert not hasattr(stream, "do_handshake")  # Hypercorn: a plain TCP stream
            assert stream.socket.getpeername() == client.getsockname()

            async def reader() -> None:
                try:
                    await stream.receive_some(1024)
                except trio.ClosedResourceError as exc:
                    outcome["reader"] = type(exc)
                finally:
                    reader_done.set()

            async with trio.open_nursery() as nursery:
                # Closing with unread data resets the connection, which ends any write.
                nursery.start_soon(_watchdog, client.close)
                nursery.start_soon(reader)
                started = trio.current_time()
                try:
                    with trio.CancelScope(shield=True):
                        for _ in range(10_000):  # 160 MiB: far beyond any socket buffer
                            await stream.send_all(b"x" * CHUNK_BYTES)
                except trio.BrokenResourceError as exc:
                    outcome["writer"] = type(exc)
                took = trio.current_time() - started
                with trio.fail_after(5):
                    await reader_done.wait()
                nursery.cancel_scope.cancel()
        assert stream.aborted, "the write ended only because the watchdog shut the client"
        assert outcome == {"writer": trio.BrokenResourceError, "reader": trio.ClosedResourceError}
        assert took < 5
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while client.recv(1 << 20):
                pass
    finally:
        client.close()


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan")])
def test_a_write_deadline_must_be_a_positive_finite_number(timeout_s):
    with pytest.raises(ValueError):
        WriteDeadlineListener(None, timeout_s)  # type: ignore[arg-type]
