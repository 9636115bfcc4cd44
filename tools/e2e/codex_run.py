"""Run the real Codex CLI against a live trioserve's Responses API and check what it shows.

Codex (``@openai/codex``, pinned in ``tools/e2e/package.json``) speaks only the Responses API.
Its own first request is ~40 KB, 9188 prompt tokens: more than SmolLM2's 8192-token context. So
the runs here use Codex's own config to send a small prompt (``SMALL_PROMPT_CONFIG``: our
instructions instead of its 17 KB ones, no skills, no permission/environment blocks, no
sub-agent, goal, image, user-input or web-search tools; what is left is its ``exec_command`` and
``write_stdin`` shell tools, 799 prompt tokens in all). A run passes only when:

- ``codex exec`` exits 0 within the timeout;
- every ``POST /v1/responses`` got a 200 stream up to ``response.completed``, with no
  ``error``, ``response.failed`` or ``response.incomplete`` event;
- the last stream's response id (``resp_...``) is in the server's debug log with the generated
  text, that text is not empty, and Codex printed it;
- ``--mode progress``: every request carried ``X-SwiftLM-Prefill-Progress: true`` (through the
  provider's ``http_headers``) and the first stream held prefill progress events;
- ``--mode tool``: the prompt makes the model call ``exec_command`` (Codex cannot send a
  ``tool_choice``, so the prompt asks SmolLM2 to repeat a call in its ``<tool_call>`` format);
  Codex ran the command in its read-only sandbox in the scratch folder and sent the output
  back as a ``function_call_output`` with the same ``call_id``; the final answer is as above;
- ``--mode overflow``: Codex's *default* prompt (no shrinking) gets one clear 400, Codex shows
  it and exits non-zero without retrying (retries are off in every mode: Codex would otherwise
  re-send a failed request up to 5 times, or 30 on a 5xx).

The wire facts come from ``recorder.Recorder``, a loopback relay between Codex and the server.
Everything stays offline and contained: HOME and CODEX_HOME in a scratch folder, no inherited
environment (no stray API keys; the provider sends no Authorization header), analytics, update
checks and request compression off, session files not written (``--ephemeral``).

``--fake`` replaces trioserve with a minimal hand-written Responses stream (``FakeResponses``),
which checks this harness itself; ``--save-requests DIR`` writes what Codex sent, as JSON.

usage: python tools/e2e/codex_run.py [--mode plain|progress|tool|overflow] [--timeout S]
                                      [--scratch DIR] [--server URL --server-log FILE | --fake]
Without ``--server`` or ``--fake`` it starts a server itself (``server_launch``: greedy by
default, debug log). Prints a JSON report; the exit code is 0 only on a pass. Needs
``tools/setup_e2e.sh`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from trioserve.testing import ServerProcess, hypercorn_argv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import CONTEXT_LIMIT, MODEL, PROGRESS_HEADER, PROMPT, ClientRun  # noqa: E402
from recorder import Exchange  # noqa: E402
from serverlog import ANY_TEXT_LINE, normalized, read_back  # noqa: E402

CODEX = harness.NODE_BIN / "codex"
PROVIDER = "trioserve"
MODES = ("plain", "progress", "tool", "overflow")
INSTRUCTIONS = "You are a helpful assistant."
TOOL_MARKER = "codex-tool-ok"
# SmolLM2 does not call a tool on its own with tool_choice "auto" (Codex sends nothing else).
# Asked to repeat a call in the <tool_call> form its chat template teaches, it does (greedy).
TOOL_CALL_TEXT = (
    '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo ' + TOOL_MARKER + '"}}\n'
    "</tool_call>"
)
TOOL_PROMPT = f"Repeat exactly this text and nothing else:\n{TOOL_CALL_TEXT}"
SHELL_TOOL = "exec_command"
# Codex sends no temperature and no max_output_tokens, and `trioserve serve` samples requests
# without one at temperature 1.0: SmolLM2 then rambles, up to --max-tokens (2048 tokens, minutes
# on a CPU), and the tool call is left to chance. So the Codex runs use a server that is greedy
# by default: trioserve's documented hypercorn launch, configured by TRIOSERVE_* variables
# (ServerConfig.default_temperature has no `serve` flag), its debug log set up by --log-config
# in `serve --log-level debug`'s format. Progress events every 0.5 s, as for OpenCode.
SERVER_ENV = {"TRIOSERVE_DEFAULT_TEMPERATURE": "0", "TRIOSERVE_HEARTBEAT_INTERVAL_S": "0.5"}
SERVER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {"trioserve": {"level": "DEBUG"}},  # the generated text of each request
}
# Stream events that end a Responses stream badly.
ERROR_EVENTS = ("error", "response.failed", "response.incomplete")

# Codex config (config.toml) that keeps its prompt small for a 135M model with an 8192-token
# context. Each key was checked with `codex exec --strict-config` (0.171.0). Measured first
# request: 4.1 KB of JSON (a developer and a user message, two tools), 799 prompt tokens with
# SmolLM2's template, instead of 40 KB and 9188 tokens.
SMALL_PROMPT_CONFIG: dict[str, object] = {
    # Our instructions replace Codex's 17 KB ones (the first developer message).
    "model_instructions_file": None,  # set per run: a file in the scratch folder
    # Codex has no metadata for unknown models (it warns and uses a fallback): say the window.
    "model_context_window": CONTEXT_LIMIT,
    "model_reasoning_summary": "none",  # reasoning: {} instead of {"summary": "auto"}
    # The <permissions instructions> developer block, the <environment_context> user block,
    # and the apps / collaboration-mode blocks.
    "include_permissions_instructions": False,
    "include_environment_context": False,
    "include_apps_instructions": False,
    "include_collaboration_mode_instructions": False,
    "web_search": "disabled",  # the web_search tool
    "features": {
        "goals": False,  # get_goal / create_goal / update_goal tools
        "view_image": False,  # the view_image tool
        "apps": False,
        "plugins": False,
    },
    "agents": {"enabled": False},  # the multi_agent_v1 namespace tool (5 nested functions)
    "skills": {"bundled": {"enabled": False}},  # the <skills_instructions> developer block
    "tools": {"experimental_request_user_input": {"enabled": False}},  # request_user_input
}

# What keeps a test run contained and quick, in every mode.
RUN_CONFIG: dict[str, object] = {
    "model": MODEL,
    "model_provider": PROVIDER,
    "approval_policy": "never",  # codex exec never asks; a rejected command goes to the model
    "sandbox_mode": "read-only",  # commands run under Codex's bundled bubblewrap, no writes
    "check_for_update_on_startup": False,
    "analytics": {"enabled": False},
    "feedback": {"enabled": False},
    "history": {"persistence": "none"},
    "features": {"enable_request_compression": False, "shell_snapshot": False},
}


def codex_config(base_url: str, mode: str, instructions: Path) -> dict:
    """The config.toml for one run, as a dict."""
    provider: dict[str, object] = {
        "name": PROVIDER,
        "base_url": base_url,
        "wire_api": "responses",
        # Fail at once: Codex retries a failed stream 5 times and a 5xx up to 30 times.
        "request_max_retries": 0,
        "stream_max_retries": 0,
    }
    if mode == "progress":
        provider["http_headers"] = {PROGRESS_HEADER: "true"}
    config = json.loads(json.dumps(RUN_CONFIG))
    if mode != "overflow":  # overflow: Codex's own default prompt
        for key, value in SMALL_PROMPT_CONFIG.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        config["model_instructions_file"] = str(instructions)
    config["model_providers"] = {PROVIDER: provider}
    return config


def to_toml(config: dict) -> str:
    """A small TOML writer for codex_config's values (str, bool, int, nested tables)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"no TOML for {v!r}")

    def table(prefix: str, d: dict) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in d.items() if not _is_table(k, v)]
        out = [f"[{prefix}]", *lines, ""] if prefix and lines else [*lines, ""]
        for k, v in d.items():
            if _is_table(k, v):
                out += table(f"{prefix}.{k}" if prefix else k, v)
        return out

    return re.sub(r"\n{3,}", "\n\n", "\n".join(table("", config))).strip() + "\n"


def _is_table(key: str, v: object) -> bool:
    # http_headers stays an inline table (its keys are header names, not config keys)
    return isinstance(v, dict) and key != "http_headers"


def server_launch(port: int, folder: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the server the Codex runs use (see ``SERVER_ENV``)."""
    logging_config = folder / "logging.json"
    logging_config.write_text(json.dumps(SERVER_LOGGING, indent=1))
    argv = hypercorn_argv(port)
    argv[-1:-1] = ["--log-config", f"json:{logging_config}"]  # before the app factory
    return argv, dict(SERVER_ENV)


def start_codex_server(folder: Path, **options) -> ServerProcess:
    """A healthy ``server_launch`` server on a free port, logging to ``folder/server.log``."""
    launch = partial(server_launch, folder=folder)
    return harness.start_logged_server(folder, launch, name="trioserve", **options)


def codex_env(scratch: Path) -> dict[str, str]:
    """A closed environment: nothing inherited but PATH."""
    home = scratch / "home"
    dirs = {"HOME": home, "CODEX_HOME": home / ".codex", "TMPDIR": scratch / "tmp"}
    return harness.scratch_env(dirs)


@dataclass(kw_only=True)
class CodexRun(ClientRun):
    mode: str
    prompt: str


def prompt_for(mode: str) -> str:
    return TOOL_PROMPT if mode == "tool" else PROMPT


async def run_codex(
    upstream_port: int, scratch: Path, *, mode: str, timeout_s: float, prompt: str | None = None
) -> CodexRun:
    """One ``codex exec PROMPT`` in the scratch project, through a Recorder to the server."""
    harness.require_client(CODEX)
    prompt = prompt_for(mode) if prompt is None else prompt
    project = scratch / "project"
    project.mkdir(parents=True, exist_ok=True)
    env = codex_env(scratch)
    instructions = scratch / "instructions.md"
    instructions.write_text(INSTRUCTIONS + "\n")
    async with harness.relayed(upstream_port, scratch / "codex") as relay:
        config = codex_config(f"http://127.0.0.1:{relay.port}/v1", mode, instructions)
        (Path(env["CODEX_HOME"]) / "config.toml").write_text(to_toml(config))
        argv = [str(CODEX), "exec", "--strict-config", "--skip-git-repo-check", "--ephemeral"]
        argv += ["--color", "never", "--sandbox", "read-only", "-C", str(project), prompt]
        await relay.run(argv, cwd=project, env=env, timeout_s=timeout_s)
    return CodexRun(mode=mode, prompt=prompt, **relay.outcome())


# -- reading the wire --------------------------------------------------------------------------


def is_progress(event: dict) -> bool:
    """A prefill progress event, whatever form the server chose (not response.in_progress)."""
    return harness.is_progress(event, not_named=("response.in_progress",))


def _output_items(events: list[dict]) -> list[dict]:
    return [e["item"] for e in events if e.get("type") == "response.output_item.done"]


def _message_text(items: list[dict]) -> str:
    return "".join(
        part.get("text") or ""
        for item in items
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )


def _response_id(events: list[dict]) -> str | None:
    for event in events:
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            return response["id"]
    return None


def describe(exchange: Exchange, texts: dict[str, str]) -> dict:
    """What one POST /v1/responses carried and got back."""
    body = exchange.request_json() or {}
    events = harness.stream_events(exchange) if exchange.status == 200 else []
    items = _output_items(events)
    response_id = _response_id(events)
    return {
        "target": exchange.target,
        "status": exchange.status,
        "complete": exchange.complete,
        "request_bytes": len(exchange.request_body),
        "tools": [[t.get("type"), t.get("name")] for t in body.get("tools") or []],
        "tool_choice": body.get("tool_choice"),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "store": body.get("store"),
        "stream": body.get("stream"),
        "include": body.get("include"),
        "reasoning": body.get("reasoning"),
        "input_types": [i.get("type") or i.get("role") for i in body.get("input") or []],
        "function_call_outputs": [
            {"call_id": i.get("call_id"), "output": i.get("output")}
            for i in body.get("input") or []
            if i.get("type") == "function_call_output"
        ],
        "progress_header": exchange.request_headers.get(PROGRESS_HEADER.lower()),
        "event_types": [e.get("type") or e.get("_event") for e in events],
        "progress_events": sum(is_progress(e) for e in events),
        "error_events": [e for e in events if e.get("type") in ERROR_EVENTS],
        "error_body": harness.error_body(exchange),
        "response_id": response_id,
        "function_calls": [
            {"call_id": i.get("call_id"), "name": i.get("name"), "arguments": i.get("arguments")}
            for i in items
            if i.get("type") == "function_call"
        ],
        "wire_text": _message_text(items),
        "logged_text": texts.get(response_id) if response_id else None,
    }


def _responses_exchanges(run: CodexRun) -> list[Exchange]:
    return [
        e
        for e in run.exchanges
        if e.method == "POST" and urlsplit(e.target).path.rstrip("/").endswith("/responses")
    ]


def _waiting(request: dict) -> bool:
    return bool(request["response_id"]) and request["logged_text"] is None


def verdict(run: CodexRun, server_log: Path) -> dict:
    """The report: every check that failed is a reason; ok when there is none."""
    exchanges = _responses_exchanges(run)
    requests = read_back(server_log, exchanges, describe, waiting=_waiting, line=ANY_TEXT_LINE)
    reasons = harness.timeout_reasons("codex", run)
    others = sorted({e.target for e in run.exchanges} - {e.target for e in exchanges})
    if not requests:
        reasons.append(f"no POST /v1/responses among {len(run.exchanges)} request(s): {others}")
    elif run.mode == "overflow":
        reasons += _overflow_reasons(run, requests)
    else:
        reasons += _answer_reasons(run, requests)
    head = {"mode": run.mode, "prompt": run.prompt}
    return harness.report(run, reasons, head, {"other_requests": others, "requests": requests})


def _answer_reasons(run: CodexRun, requests: list[dict]) -> list[str]:
    reasons = harness.exit_reasons("codex", run)
    for r in requests:
        # Not r["complete"]: Codex may hang up as soon as it has read response.completed, so
        # the relay can miss the chunked body's last bytes.
        if r["status"] != 200:
            reasons.append(f"a request got HTTP {r['status']}: {r['error_body']}")
        if r["error_events"]:
            reasons.append(f"an error event reached codex: {r['error_events'][0]}")
        if r["status"] == 200 and "response.completed" not in r["event_types"]:
            reasons.append(f"a stream had no response.completed: {r['event_types']}")
    final = requests[-1]
    reasons += harness.last_answer_reasons(
        "codex", run, final, id_key="response_id", id_name="response"
    )
    reasons += harness.progress_reasons(run.mode == "progress", requests)
    if run.mode == "tool":
        reasons += _tool_reasons(requests)
    return reasons


def _tool_reasons(requests: list[dict]) -> list[str]:
    calls = requests[0]["function_calls"]
    if not calls:
        return [f"the model did not call a tool; it said {requests[0]['wire_text']!r}"]
    call = calls[0]
    reasons = []
    if call["name"] != SHELL_TOOL:
        reasons.append(f"the model called {call['name']!r}, not {SHELL_TOOL!r}")
    try:
        command = json.loads(call["arguments"]).get("cmd")
    except (TypeError, ValueError, AttributeError):
        command = None
        reasons.append(f"the call's arguments are not a JSON object string: {call['arguments']!r}")
    if command is not None and TOOL_MARKER not in command:
        reasons.append(f"the model's command does not print the marker: {command!r}")
    if len(requests) < 2:
        return [*reasons, "codex sent no request after the tool call"]
    outputs = [o for r in requests[1:] for o in r["function_call_outputs"]]
    mine = [o for o in outputs if o["call_id"] == call["call_id"]]
    if not mine:
        reasons.append(f"no function_call_output for call_id {call['call_id']!r}: {outputs}")
    elif TOOL_MARKER not in str(mine[0]["output"]):
        reasons.append(f"the command's output lacks the marker: {mine[0]['output']!r}")
    return reasons


def _overflow_reasons(run: CodexRun, requests: list[dict]) -> list[str]:
    """Codex's default prompt is over the context: one 400 that Codex shows, no retry."""
    reasons = []
    if run.returncode == 0:
        reasons.append("codex exited 0 although its prompt is over the model's context")
    if len(requests) != 1:
        reasons.append(f"codex sent {len(requests)} requests, not 1 (retried?)")
    first = requests[0]
    if first["status"] != 400:
        reasons.append(f"the over-long request got HTTP {first['status']}, not 400")
    message = ((first["error_body"] or {}).get("error") or {}).get("message")
    code = ((first["error_body"] or {}).get("error") or {}).get("code")
    if not message:
        reasons.append(f"the 400 has no error.message: {first['error_body']}")
    # Codex prints the error body's message, or for code context_length_exceeded its own line.
    shown = normalized(run.stderr + run.stdout)
    if message and normalized(message) not in shown and "context window" not in shown:
        reasons.append(f"codex does not show the error (code {code!r}, message {message!r})")
    return reasons


# -- a hand-written Responses stream, to check the harness without trioserve ------------------


class FakeResponses(harness.FakeServer):
    """The smallest ``/v1/responses`` streams Codex accepts, plus the progress form we expect.

    A request whose input has a ``function_call_output`` gets a text answer quoting the
    command's output; a prompt holding a ``<tool_call>`` gets an ``exec_command`` call; an
    input over ~30 KB gets a 400 ``context_length_exceeded``; anything else, a fixed answer.
    Each answer's text is logged the way trioserve logs it, so ``verdict`` reads it back.
    """

    ANSWER = "The capital of France is Paris."

    def answer(self, path: str, raw: bytes, progress: bool) -> tuple[int, bytes, str]:
        n = self.next_number()
        body = json.loads(raw)
        if len(raw) > 30_000:
            error = {
                "message": f"fake: the prompt is {len(raw)} bytes, over the context",
                "type": "invalid_request_error",
                "param": "input",
                "code": "context_length_exceeded",
            }
            return 400, json.dumps({"error": error}).encode(), "application/json"
        inputs = body.get("input") or []
        outputs = [i for i in inputs if i.get("type") == "function_call_output"]
        prompt = json.dumps(inputs)
        if outputs:
            last = str(outputs[-1].get("output")).strip().splitlines()[-1:]
            item = _message(n, f"The command printed {last[0] if last else ''}.")
        elif "<tool_call>" in prompt:
            arguments = json.dumps({"cmd": f"echo {TOOL_MARKER}"})
            item = {
                "type": "function_call",
                "id": f"fc_{n}",
                "call_id": f"call_{n}",
                "name": SHELL_TOOL,
                "arguments": arguments,
                "status": "completed",
            }
        else:
            item = _message(n, self.ANSWER)
        self.log_text(n, f"resp_fake{n}", _message_text([item]))
        return 200, _stream(n, body.get("model"), item, progress).encode(), "text/event-stream"


def _message(n: int, text: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": f"msg_{n}",
        "role": "assistant",
        "status": "completed",
        "content": content,
    }


def _stream(n: int, model: str | None, item: dict, progress: bool) -> str:
    """response.created, progress, the item's added/delta/done events, response.completed."""
    seq = iter(range(1_000_000))
    rid = f"resp_fake{n}"
    response = {"id": rid, "object": "response", "status": "in_progress", "model": model}
    events = [("response.created", {"response": {**response, "output": []}})]
    if progress:
        events.append(
            (
                "prefill_progress",
                {"status": "processing", "n_past": 8, "n_prompt_tokens": 16, "fraction": 0.5},
            )
        )
    events.append(("response.output_item.added", {"output_index": 0, "item": {**item}}))
    if item["type"] == "message":
        delta = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events.append(("response.output_text.delta", {**delta, "delta": _message_text([item])}))
    else:
        delta = {"item_id": item["id"], "output_index": 0, "delta": item["arguments"]}
        events.append(("response.function_call_arguments.delta", delta))
    events.append(("response.output_item.done", {"output_index": 0, "item": item}))
    usage = {
        "input_tokens": 16,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 8,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 24,
    }
    done = {**response, "status": "completed", "output": [item], "usage": usage}
    events.append(("response.completed", {"response": done}))
    out = [": the fake's comment line, which codex must skip\n\n"]
    for name, data in events:
        typed = data if name == "prefill_progress" else {"type": name, **data}
        out.append(
            f"event: {name}\ndata: {json.dumps({**typed, 'sequence_number': next(seq)})}\n\n"
        )
    return "".join(out)


# -- requests as fixtures ----------------------------------------------------------------------


def request_fixture(exchange: Exchange, scratch: Path) -> dict:
    """One request as JSON, the scratch folder's path and the relay's port made neutral."""
    return harness.request_fixture(exchange, _neutral(scratch))


def _neutral(scratch: Path) -> list[tuple[str, str]]:
    return [(str(scratch), "/scratch")]


def save_requests(run: CodexRun, scratch: Path, folder: Path) -> list[str]:
    return harness.save_requests(_responses_exchanges(run), run.mode, folder, _neutral(scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="plain")
    harness.add_target_args(parser, fake_help="a hand-written Responses stream")
    parser.add_argument("--timeout", type=float, default=180, help="seconds (default 180)")
    parser.add_argument("--scratch", type=Path, help="HOME, CODEX_HOME and project (kept)")
    parser.add_argument("--prompt", help="instead of the mode's prompt")
    parser.add_argument("--save-requests", type=Path, metavar="DIR", help="write them as JSON")
    args = parser.parse_args(argv)
    harness.check_target_args(parser, args)
    scratch = harness.scratch_folder(args.scratch, "trioserve-codex-")
    with contextlib.ExitStack() as stack:
        port, log_path = harness.open_target(
            stack, parser, args, scratch, start=start_codex_server, fake=FakeResponses
        )
        run = trio.run(
            partial(
                run_codex,
                port,
                scratch,
                mode=args.mode,
                timeout_s=args.timeout,
                prompt=args.prompt,
            )
        )
        report = verdict(run, log_path)
    saved = save_requests(run, scratch, args.save_requests) if args.save_requests else None
    return harness.finish(report, scratch, saved)


if __name__ == "__main__":
    sys.exit(main())
