"""Browser tests: Debian's chromium driven by Python Playwright against a live server.

``tools/setup_browser.sh`` (run by ``tools/bootstrap.sh``) installs both. Without them the
tests skip on a developer's machine, but fail under ``CI`` (set by CI), where a missing
browser is a broken install, not a reason to skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import launch  # noqa: F401 - the live-server fixture

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
LAUNCH_TIMEOUT_MS = 30_000


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (run tools/setup_browser.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (run tools/setup_browser.sh)"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """One headless chromium for the session; a failed start is an error, never a skip."""
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(f"browser tests need chromium and playwright: {missing}")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
        )
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        pw.stop()
