"""The structured-concurrency rules the code base keeps, checked by flake8-async.

ASYNC900: no async generator in ``trioserve/`` (a generator suspended at ``yield`` inside a
nursery or cancel scope is PEP 789's hazard; response bodies and event streams are plain
async iterators instead), except under the decorators that transform them safely
(``contextlib.asynccontextmanager``, ``trio.as_safe_channel``). ASYNC119 is in ruff's lint too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_async_generators_or_yields_inside_scopes_in_the_package():
    files = sorted(str(p) for p in (ROOT / "trioserve").rglob("*.py"))
    result = subprocess.run(
        [sys.executable, "-m", "flake8_async", "--enable=ASYNC900,ASYNC119", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_checker_does_flag_an_async_generator_body(tmp_path):
    """The check above can fail: the old response body shape is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import trio\n\n\nasync def body(frames):\n"
        "    async with trio.open_nursery():\n"
        "        async for frame in frames:\n"
        "            yield frame\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "flake8_async", "--enable=ASYNC900,ASYNC119", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ASYNC900" in result.stdout and "ASYNC119" in result.stdout, result.stdout
