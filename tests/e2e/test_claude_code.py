"""The real Claude Code CLI (pinned in tools/e2e) answers through our Messages API, offline.

`tools/e2e/claude_run.py` runs `claude -p` in a scratch HOME with `ANTHROPIC_BASE_URL` on a
recording relay, nonessential traffic off, every other connection sent to a refusing sink, and
the options that keep its request small enough for SmolLM2's 8192-token context (`--bare
--tools "" --system-prompt ...`, `CLAUDE_CODE_MAX_OUTPUT_TOKENS=256`,
`CLAUDE_CODE_MAX_CONTEXT_TOKENS=8192`), and reports what went over the wire. A run passes only
when Claude Code exits 0 and prints the text the server logged for the last message; the
opted-in run must also carry the progress header (`ANTHROPIC_CUSTOM_HEADERS`) and receive
progress events; the tool run must have Claude Code execute the model's `Read` call and send
the file back as a `tool_result`. Claude Code's default request (~49 KB, ~12.7k tokens) must
get one clear error.

Claude Code sends no temperature, so these runs use their own server, greedy by default, with
`--model-alias 'claude-*'` (``claude_run.start_claude_server``): short answers, the same each
time, and Claude Code's own model names served.
The hand-written-stream tests need Claude Code but not the model: they check the harness
itself and that the pinned Claude Code still accepts the stream shape trioserve is built to
send, and how it reports each kind of error.
"""

from __future__ import annotations

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

claude_run = _load_tool("claude_run")

CLAUDE = NODE_MODULES / ".bin" / "claude"
# Every run is bounded. A small request is ~50 prompt tokens (~500 in the tool run, twice):
# seconds on an idle 2-core machine.
CLAUDE_TIMEOUT_S = 180
TOOL = claude_run.TOOL
TOOL_MARKER = claude_run.TOOL_MARKER  # what the file the model reads holds
MESSAGES_TARGET = "/v1/messages?beta=true"


claude_server = driver_server(claude_run.start_claude_server, "claude-server")


def run_harness(tmp_path, mode: str, *target: str) -> tuple[dict, str]:
    """claude_run.py's JSON report for one mode, and the context to show when a check fails."""
    require_cli(CLAUDE)
    keys = ("reasons", "returncode", "stdout", "stderr_tail", "other_requests", "requests")
    args = ("--mode", mode, *target)
    return run_driver("claude_run.py", tmp_path, *args, timeout_s=CLAUDE_TIMEOUT_S, keys=keys)


def assert_contained(report: dict, context: str) -> None:
    """Only POST /v1/messages on the loopback server: no other endpoint, no network."""
    assert report["other_requests"] == [], context
    assert report["outside_connections"] == [], context


def assert_streams_completed(report: dict, context: str) -> None:
    for r in report["requests"]:
        assert r["target"] == MESSAGES_TARGET, context
        assert r["status"] == 200, context
        assert r["stream"] is True, context
        assert r["anthropic_version"] == "2023-06-01" and r["x_api_key"], context
        assert r["max_tokens"] == claude_run.MAX_OUTPUT_TOKENS, context
        assert not r["error_events"], context
        assert r["event_types"][0] == "message_start", context
        assert r["event_types"][-1] == "message_stop", context
        assert r["message_id"] and r["message_id"].startswith("msg_"), context
        assert r["stop_reason"] in ("end_turn", "tool_use"), context


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "progress"])
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CLAUDE_TIMEOUT_S + 120)  # its bound, and a start
def test_claude_code_prints_the_servers_answer(claude_server, tmp_path, mode):
    report, context = run_harness(tmp_path, mode, *live(claude_server))
    assert report["returncode"] == 0, context
    (request,) = report["requests"]  # one turn, one request: no retry, no title request
    assert request["request_bytes"] < 2000, context  # not Claude Code's default ~49 KB
    assert request["model"] == claude_run.MODEL and request["tools"] == [], context
    assert request["thinking"] == {"type": "adaptive", "display": "omitted"}, context
    assert_contained(report, context)
    assert_streams_completed(report, context)
    assert_printed_the_last_answer(report, context)
    assert_progress_as_asked(request, mode, context)
    assert report["ok"], context


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CLAUDE_TIMEOUT_S + 120)
def test_claude_code_own_model_name_is_served_through_the_alias(claude_server, tmp_path):
    """No --model: Claude Code asks for its default claude-* model, which --model-alias maps."""
    report, context = run_harness(tmp_path, "plain", "--model", "", *live(claude_server))
    assert report["returncode"] == 0, context
    (request,) = report["requests"]
    assert request["model"].startswith("claude-"), context
    assert_contained(report, context)
    assert_streams_completed(report, context)
    assert_printed_the_last_answer(report, context)
    assert report["ok"], context


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CLAUDE_TIMEOUT_S + 120)
def test_claude_code_runs_the_models_read_call_and_sends_the_result_back(claude_server, tmp_path):
    report, context = run_harness(tmp_path, "tool", *live(claude_server))
    assert report["returncode"] == 0, context
    first, *rest = report["requests"]
    assert rest, context  # the call was answered with a second request
    assert_contained(report, context)
    assert_streams_completed(report, context)
    assert all(r["tools"] == [TOOL] for r in report["requests"]), context
    assert first["stop_reason"] == "tool_use", context
    (use,) = first["tool_uses"]
    assert use["name"] == TOOL and use["id"], context
    assert use["input"] == {"file_path": str(tmp_path / "project" / claude_run.TOOL_FILE)}, context
    # Claude Code read the file and sent it back, numbered by line, under the same id.
    results = [t for r in rest for t in r["tool_results"]]
    assert [t["tool_use_id"] for t in results][:1] == [use["id"]], context
    assert not results[0]["is_error"], context
    assert TOOL_MARKER in results[0]["content"], context
    assert rest[0]["roles"] == ["user", "assistant", "user"], context
    assert_printed_the_last_answer(report, context)
    assert report["ok"], context


@pytest.mark.slow
@pytest.mark.timeout(STARTUP_TIMEOUT_S + CLAUDE_TIMEOUT_S + 120)
def test_claude_code_default_request_over_the_context_gets_a_clear_error(claude_server, tmp_path):
    """Claude Code's own ~12.7k-token request is over SmolLM2's 8192: a 400 that it shows."""
    report, context = run_harness(tmp_path, "overflow", *live(claude_server))
    assert report["returncode"] not in (0, None), context
    first = report["requests"][0]
    assert first["request_bytes"] > 30_000, context
    assert len(first["tools"]) > 5 and first["max_tokens"] > 8192, context
    assert first["status"] == 400, context
    assert first["error_body"]["type"] == "error", context
    assert first["error_body"]["error"]["type"] == "invalid_request_error", context
    assert first["error_body"]["error"]["message"], context
    assert_contained(report, context)
    assert report["ok"], context


@pytest.mark.parametrize("mode", ["plain", "progress", "tool", "overflow"])
@pytest.mark.timeout(CLAUDE_TIMEOUT_S + 120)
def test_the_harness_passes_a_hand_written_messages_stream(tmp_path, mode):
    """claude_run.py --fake: the smallest stream Claude Code accepts, our progress event in it."""
    report, context = run_harness(tmp_path, mode, "--fake")
    assert report["ok"], context
    assert_contained(report, context)
    if mode == "progress":
        assert report["requests"][0]["progress_events"] == 1, context
    if mode == "tool":
        assert len(report["requests"]) == 2, context
    if mode == "overflow":
        (request,) = report["requests"]  # "prompt is too long: N tokens > M": not re-sent
        assert claude_run.CLAUDE_OVERFLOW_LINE in report["stdout"], context


@pytest.mark.parametrize("error", sorted(claude_run.FAKE_ERROR_BEHAVIOUR))
@pytest.mark.timeout(CLAUDE_TIMEOUT_S + 120)
def test_claude_code_reports_each_error_answer_and_stops(tmp_path, error):
    """Anthropic's error JSON with each status (or an error event): Claude Code exits
    non-zero, shows our message where it shows any, and with its retries off sends the
    request only as often as ``claude_run.FAKE_ERROR_BEHAVIOUR`` says."""
    report, context = run_harness(tmp_path, "plain", "--fake", "--fake-error", error)
    assert report["returncode"] not in (0, None), context
    assert_contained(report, context)
    assert report["ok"], context
