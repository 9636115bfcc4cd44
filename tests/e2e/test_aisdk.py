"""The Vercel AI SDK (`ai` + `@ai-sdk/openai-compatible`, pinned in tools/e2e) reads our streams.

It validates every SSE payload against its chunk schema, so an opted-in progress event that is
not a valid chunk would surface as an error part. `tools/e2e/aisdk_check.mjs` fails on any
error part or thrown error; here the answer is also checked against the server's own log.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.conftest import E2E_TOOLS, require_clients, serverlog
from trioserve.testing import STARTUP_TIMEOUT_S

pytestmark = pytest.mark.slow

CHECK_TIMEOUT_S = 300


def _logged_text(server, completion_id: str) -> str | None:
    """The server logs the text as the stream ends; allow it a moment to reach the file."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = serverlog.logged_texts(server.log_text()).get(completion_id)
        if text is not None:
            return text
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("progress", [False, True], ids=["plain", "progress"])
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CHECK_TIMEOUT_S + 60)  # may start the server first
def test_ai_sdk_stream_text_has_no_error_part(e2e_server, progress):
    require_clients()
    argv = ["node", "aisdk_check.mjs", "--base-url", e2e_server.v1]
    if progress:
        argv.append("--progress")
    proc = subprocess.run(
        argv, cwd=E2E_TOOLS, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S
    )
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], report["errors"]
    assert proc.returncode == 0 and report["ok"], report
    assert report["finishReason"] in {"stop", "length"}
    assert report["usage"]["outputTokens"] >= 1
    assert "Paris" in report["text"]
    assert report["id"].startswith("chatcmpl-")
    assert _logged_text(e2e_server, report["id"]) == report["text"]
    if progress:
        # At least the final fraction-1.0 event: it went through the SDK's validation.
        assert report["progressChunks"] >= 1, report
    else:
        assert report["progressChunks"] == 0, report
