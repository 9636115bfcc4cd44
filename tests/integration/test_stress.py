"""The short variant of tools/stress.py: random disconnects, injected model faults, stalled
readers and overload, then no leak anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "stress.py"


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
        timeout=600,
    )
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "LEAK/FAIL" not in result.stdout
    assert "hung_up" in result.stdout, f"no request hung up: the storm tested nothing\n{report}"
    assert "completed" in result.stdout, report
    # Injected model faults came back as clean errors (a wrong report counts as malformed).
    assert "fault_reported" in result.stdout, report
    # Clients that stopped reading with the socket open were dropped, slot and connection.
    assert "dropped_stalled" in result.stdout, report
