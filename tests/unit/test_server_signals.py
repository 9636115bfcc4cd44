"""``trioserve serve``'s signals, in-process: the first drains, a second forces the exit.

Signals raised here reach Trio's ``open_signal_receiver`` (pytest-trio runs on the main
thread); ``force_exit`` is replaced, so nothing kills the test process. The real exit is
checked in a child process.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio
import trio.testing

from trioserve.drain import Drain
from trioserve.server import _stop_on_signals


async def test_the_first_signal_drains_and_a_second_forces_the_exit():
    stop = trio.Event()
    drain = Drain(grace_s=60)
    forced: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, stop, drain, forced.append)
            await trio.testing.wait_all_tasks_blocked()  # the receiver is installed
            signal.raise_signal(signal.SIGTERM)
            await stop.wait()
            assert drain.draining and not drain.expired and forced == []
            signal.raise_signal(signal.SIGINT)
        # _stop_on_signals returned by itself: the nursery closed without a cancel.
    assert forced == [signal.SIGINT]
    assert not drain.expired  # forced long before the 60 s grace


async def test_after_the_grace_period_the_drain_expires(autojump_clock):
    stop = trio.Event()
    drain = Drain(grace_s=4)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, stop, drain, pytest.fail)
            await trio.testing.wait_all_tasks_blocked()
            signal.raise_signal(signal.SIGINT)
            await stop.wait()
            started = trio.current_time()
            while not drain.expired:  # noqa: ASYNC110 - Drain has no event to wait on
                await trio.sleep(0.5)
            assert trio.current_time() - started == pytest.approx(4, abs=0.5)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_exit_by_signal_ends_the_process_by_that_signal(signum):
    code = f"from trioserve.server import exit_by_signal; exit_by_signal({int(signum)})"
    result = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert result.returncode == -signum, result.stderr.decode()[-2000:]
