"""The real Codex CLI (pinned in tools/e2e) answers through our Responses API, offline.

`tools/e2e/codex_run.py` runs `codex exec` in a scratch HOME / CODEX_HOME with a custom model
provider (`wire_api = "responses"`) and the config that keeps Codex's prompt small enough for
SmolLM2's 8192-token context, through a recording relay, and reports what went over the wire.
A run passes only when Codex exits 0 and prints the text the server logged for the last
response; the opted-in run must also carry the progress header and receive progress events; the
tool run must have Codex execute the model's `exec_command` call and send its output back as a
`function_call_output`. Codex's default prompt (~10k tokens) must get one clear error.

Codex sends no temperature, so these runs use their own server, greedy by default
(``codex_run.start_codex_server``): short answers, the same each time.
The hand-written-stream tests need Codex but not the model: they check the harness itself and
that the pinned Codex still accepts the stream shape trioserve is built to send.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import (
    NODE_MODULES,
    _load_tool,
    assert_printed_the_last_answer,
    assert_progress_as_asked,
    driver_server,
    live,
    require_cli,
    run_driver,
)
from trioserve.testing import STARTUP_TIMEOUT_S

codex_run = _load_tool("codex_run")

CODEX = NODE_MODULES / ".bin" / "codex"
# Codex waits up to 5 minutes on a silent stream; every run is bounded. One ~800-token prefill
# per request (two in the tool run) takes seconds on an idle 2-core machine.
CODEX_TIMEOUT_S = 180
TOOL_MARKER = codex_run.TOOL_MARKER  # what the model's command prints
SHELL_TOOL = codex_run.SHELL_TOOL  # Codex's shell tool (unified exec) on Linux


codex_server = driver_server(codex_run.start_codex_server, "codex-server")


def run_harness(tmp_path, mode: str, *target: str) -> tuple[dict, str]:
    """codex_run.py's JSON report for one mode, and the context to show when a check fails."""
    require_cli(CODEX)
    keys = ("reasons", "returncode", "stdout", "stderr_tail", "requests")
    args = ("--mode", mode, *target)
    return run_driver("codex_run.py", tmp_path, *args, timeout_s=CODEX_TIMEOUT_S, keys=keys)


def assert_streams_completed(report: dict, context: str) -> None:
    for r in report["requests"]:
        assert r["target"] == "/v1/responses", context
        # Not r["complete"]: Codex may hang up once it has read response.completed, before the
        # relay has the chunked body's last bytes; response.completed is what it needs.
        assert r["status"] == 200, context
        assert r["stream"] is True and r["store"] is False, context
        assert r["tool_choice"] == "auto", context
        # The small-prompt config leaves Codex's shell tools only.
        assert [name for _, name in r["tools"]] == [SHELL_TOOL, "write_stdin"], context
        assert not r["error_events"], context
        assert r["event_types"][-1] == "response.completed", context
        assert r["response_id"], context


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "progress"])
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CODEX_TIMEOUT_S + 120)  # its bound, and a start
def test_codex_exec_prints_the_servers_answer(codex_server, tmp_path, mode):
    report, context = run_harness(tmp_path, mode, *live(codex_server))
    assert report["returncode"] == 0, context
    (request,) = report["requests"]  # one turn, one request: no retry, no title request
    assert request["request_bytes"] < 8000, context  # not Codex's default ~40 KB
    assert_streams_completed(report, context)
    assert_printed_the_last_answer(report, context)
    assert_progress_as_asked(request, mode, context)
    assert report["ok"], context


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CODEX_TIMEOUT_S + 120)
def test_codex_runs_the_models_shell_call_and_sends_its_output_back(codex_server, tmp_path):
    report, context = run_harness(tmp_path, "tool", *live(codex_server))
    assert report["returncode"] == 0, context
    first, *rest = report["requests"]
    assert rest, context  # the call was answered with a second request
    assert_streams_completed(report, context)
    (call,) = first["function_calls"]
    assert call["name"] == SHELL_TOOL and call["call_id"], context
    assert TOOL_MARKER in json.loads(call["arguments"])["cmd"], context
    # Codex ran it (read-only sandbox, scratch folder) and sent back what it printed.
    outputs = [o for r in rest for o in r["function_call_outputs"]]
    assert [o["call_id"] for o in outputs][:1] == [call["call_id"]], context
    assert TOOL_MARKER in outputs[0]["output"], context
    assert_printed_the_last_answer(report, context)
    assert report["ok"], context


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CODEX_TIMEOUT_S + 120)
def test_codex_default_prompt_over_the_context_gets_a_clear_error(codex_server, tmp_path):
    """Codex's own ~10k-token prompt is over SmolLM2's 8192: one 400 that Codex shows."""
    report, context = run_harness(tmp_path, "overflow", *live(codex_server))
    assert report["returncode"] not in (0, None), context
    (request,) = report["requests"]  # no retry (Codex's retries are off in the harness)
    assert request["request_bytes"] > 30_000, context
    assert {"namespace", "web_search"} <= {kind for kind, _ in request["tools"]}, context
    assert request["status"] == 400, context
    assert request["error_body"]["error"]["message"], context
    assert report["ok"], context


@pytest.mark.parametrize("mode", ["plain", "progress", "tool", "overflow"])
@pytest.mark.timeout(CODEX_TIMEOUT_S + 120)
def test_the_harness_passes_a_hand_written_responses_stream(tmp_path, mode):
    """codex_run.py --fake: the smallest stream Codex accepts, and our progress event in it."""
    report, context = run_harness(tmp_path, mode, "--fake")
    assert report["ok"], context
    if mode == "progress":
        assert report["requests"][0]["progress_events"] == 1, context
    if mode == "tool":
        assert len(report["requests"]) == 2, context
