"""The real OpenCode CLI (pinned in tools/e2e) answers through our server, offline.

`tools/e2e/opencode_run.py` runs `opencode run` in a scratch HOME with a provider config for
`@ai-sdk/openai-compatible`, through a recording relay, and reports what went over the wire.
A run passes only when OpenCode exits 0 and prints the text the server logged for its agent
turn; the opted-in run must also carry the progress header and receive progress events.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import E2E_TOOLS, require_clients, serverlog
from trioserve.testing import STARTUP_TIMEOUT_S

pytestmark = pytest.mark.slow

# OpenCode re-asks forever on a broken stream: every run is bounded. Two prefills (title and
# agent turn, ~2800 prompt tokens) take well under a minute on an idle 2-core machine.
OPENCODE_TIMEOUT_S = 300


@pytest.mark.parametrize("progress", [False, True], ids=["plain", "progress"])
@pytest.mark.timeout(STARTUP_TIMEOUT_S + OPENCODE_TIMEOUT_S + 120)  # its bound, and a start
def test_opencode_run_prints_the_servers_answer(e2e_server, tmp_path, progress):
    require_clients()
    argv = [sys.executable, str(E2E_TOOLS / "opencode_run.py"), "--server", e2e_server.url]
    argv += ["--server-log", str(e2e_server.log_path), "--scratch", str(tmp_path)]
    argv += ["--timeout", str(OPENCODE_TIMEOUT_S)]
    if progress:
        argv.append("--progress")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=OPENCODE_TIMEOUT_S + 60)
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    context = json.dumps({k: report[k] for k in ("reasons", "stdout", "requests")}, indent=1)
    # OpenCode's own log tail first: it says what it was waiting for.
    assert not report["timed_out"], f"{report['stderr_tail'][-2500:]}\n{context}"
    assert report["returncode"] == 0, f"{report['stderr_tail'][-2500:]}\n{context}"

    # OpenCode's agent turn: a streamed chat request with its tools and usage requested.
    agent = [r for r in report["requests"] if r["tools"]]
    assert agent, context
    turn = agent[-1]
    assert turn["tool_choice"] == "auto", context
    assert turn["stream_options"] == {"include_usage": True}, context
    assert turn["status"] == 200 and turn["complete"], context
    assert all(not r["error_chunks"] for r in report["requests"]), context

    # What the server generated for that stream is what OpenCode printed.
    text = turn["logged_text"]
    assert text is not None and text.strip(), context
    assert serverlog.normalized(text) in serverlog.normalized(report["stdout"]), context

    headers = {r["progress_header"] for r in report["requests"]}
    if progress:
        assert headers == {"true"}, context
        assert turn["progress_events"] >= 1, context
    else:
        assert headers == {None}, context
        assert all(r["progress_events"] == 0 for r in report["requests"]), context
    assert proc.returncode == 0 and report["ok"], context
