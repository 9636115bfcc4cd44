"""The short variant of tools/stress.py: random disconnects, injected model faults, stalled
readers and overload, then no leak anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "stress.py"
TOOL_TIMEOUT_S = 600
# A row of the tool's outcome table: kind, outcome, count.
OUTCOME_ROW = re.compile(r"^(plain|stream|stall)\s+(\S+)\s+(\d+)$", re.MULTILINE)


def outcomes(report: str) -> Counter:
    """Requests per exact outcome, over all kinds (``completed`` is not
    ``completed_before_hang_up``)."""
    counts: Counter = Counter()
    for _kind, outcome, count in OUTCOME_ROW.findall(report):
        counts[outcome] += int(count)
    return counts


@pytest.mark.timeout(TOOL_TIMEOUT_S + 60)  # the tool's own bound fires first
def test_short_stress_leaves_no_leak():
    result = subprocess.run(
        # A small prefix cache still exercises its store/lookup paths under random
        # disconnects, without its own (bounded, intended) memory blurring the RSS check.
        [
            sys.executable,
            str(TOOL),
            "--clients",
            "12",
            "--warmup",
            "8",
            "--duration",
            "12",
            "--max-requests",
            "400",
            "--prefix-cache-mb",
            "32",
            "--fault-rate",
            "0.4",
            "--stall-rate",
            "0.3",
            # Room for every client in the queue, and a long queue timeout: 3/4 of the plans
            # hang up on purpose, so 429s on top starved some runs of any completed request.
            # (429s and queue timeouts have their own tests in test_reliability.py.)
            "--max-queue",
            "8",
            "--queue-timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "LEAK/FAIL" not in result.stdout
    counts = outcomes(result.stdout)
    hung_up = sum(n for outcome, n in counts.items() if outcome.startswith("hung_up"))
    assert hung_up, f"no request hung up: the storm tested nothing\n{report}"
    assert counts["completed"], f"no request completed normally\n{report}"
    # Injected model faults came back as clean errors (a wrong report counts as malformed).
    assert "fault_reported" in result.stdout, report
    # Clients that stopped reading with the socket open were dropped, slot and connection.
    assert counts["dropped_stalled"], report
