"""Shared fixtures: the embedded model, converted once per machine into the user cache; and a
Trio-native deadline under pytest-timeout's for every Trio test."""

from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path

import pytest
import trio

# Load the fast BLAS before anything imports mlx (see trioserve/blas.py).
import trioserve  # noqa: F401  # isort: skip

_DEADLINE = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from trioserve.models import resolve

    return resolve(None).path


# pytest-timeout (the `timeout` in pyproject.toml) ends a hung test with SIGALRM, raised
# wherever the main thread is. Inside trio.run that breaks Trio's run state, and every later
# Trio test of the session then fails with "Attempted to call run() from inside a run()". So
# a Trio test body also runs under trio.fail_after, a little before the alarm: a hang ends
# with trio.TooSlowError in that test, its fixtures are torn down, and the session goes on.


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-timeout's
def pytest_timeout_set_timer(item: pytest.Item, settings) -> None:
    """pytest-timeout's hook, called as the test starts (setup included): note its deadline,
    then return None so pytest-timeout still sets its own alarm."""
    item.stash[_DEADLINE] = time.monotonic() + settings.timeout


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-trio wraps the test
def pytest_runtest_call(item: pytest.Item):
    deadline = item.stash.get(_DEADLINE, None)
    test = getattr(item, "obj", None)
    is_trio = item.get_closest_marker("trio") is not None and inspect.iscoroutinefunction(test)
    # Under a test's own clock (a MockClock that jumps) a wall-clock deadline means nothing.
    own_clock = any(isinstance(v, trio.abc.Clock) for v in getattr(item, "funcargs", {}).values())
    if deadline is not None and is_trio and not own_clock:
        from pytest_timeout import is_debugging

        if not is_debugging():
            left = deadline - time.monotonic()
            item.obj = _under_deadline(test, max(left - min(10.0, left / 10), 1.0))
    yield


def _under_deadline(test, seconds: float):
    @functools.wraps(test)
    async def run(**kwargs):
        with trio.fail_after(seconds):
            return await test(**kwargs)

    return run
