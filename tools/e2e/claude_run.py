"""Run the real Claude Code CLI against a live trioserve's Messages API and check what it shows.

Claude Code (``@anthropic-ai/claude-code``, pinned in ``tools/e2e/package.json``; a native
binary per platform) speaks Anthropic's Messages API: ``POST /v1/messages?beta=true``. Its
default first request is ~49 KB (a 7 KB system prompt, twelve tools, ``max_tokens: 32000``),
12.7k prompt tokens: over SmolLM2's 8192-token context. The runs here shrink it with Claude
Code's own options (``SMALL_REQUEST_ARGS`` / ``SMALL_REQUEST_ENV``: ``--bare``, no tools, our
one-line system prompt, 256 output tokens, and the model's real window) to 890 bytes and 44
prompt tokens (2.2 KB and ~560 tokens with the one tool of the tool run). A run passes only
when:

- ``claude -p PROMPT`` exits 0 within the timeout;
- every ``POST /v1/messages`` got a 200 stream with ``message_stop``, no ``error`` event, and
  was a streamed request (the non-streamed fallback is off, so a stream Claude Code rejects
  fails the run instead of being re-sent as ``stream: false``);
- the last stream's message id (``msg_...``) is in the server's debug log with the generated
  text, that text is not empty, and Claude Code printed it;
- nothing tried to leave the machine: HTTP(S)_PROXY point at a local sink that records and
  refuses every connection (``NO_PROXY`` exempts the loopback server);
- ``--mode progress``: every request carried ``X-SwiftLM-Prefill-Progress: true`` (through
  ``ANTHROPIC_CUSTOM_HEADERS``) and the first stream held prefill progress events;
- ``--mode tool``: only the ``Read`` tool is enabled (and allowed); the prompt makes the model
  call it on a marker file in the scratch project (Claude Code sends no ``tool_choice``, so the
  prompt asks SmolLM2 to repeat a call in its ``<tool_call>`` format); Claude Code read the file
  and sent it back as a ``tool_result`` with the same ``tool_use_id``; the final answer is as
  above;
- ``--mode overflow``: Claude Code's *default* request (no shrinking, no window setting) gets
  a clear 400 in Anthropic's error shape, and Claude Code shows it and exits non-zero.

Retries are off in every mode (``CLAUDE_CODE_MAX_RETRIES=0``): Claude Code would otherwise
re-send a failed request up to 10 times with backoff (a 401 included). A 400 it does not
recognise is still re-sent twice with fewer betas and ``thinking`` fields; that is not a retry
setting, and the overflow check allows it.

The wire facts come from ``recorder.Recorder``, a loopback relay between Claude Code and the
server. Everything stays offline and contained: HOME and TMPDIR in a scratch folder, no
inherited environment but PATH (no stray keys; ``ANTHROPIC_API_KEY`` is a dummy sent as
``x-api-key``), nonessential traffic off (without it Claude Code connects to
api.anthropic.com three times per run), no session files (``--no-session-persistence``).

``--fake`` replaces trioserve with a minimal hand-written Messages stream (``FakeMessages``),
which checks this harness itself; ``--fake-error STATUS`` (or ``event``) makes the fake answer
every request with Anthropic's error JSON (or an ``error`` event after ``message_start``);
``--save-requests DIR`` writes what Claude Code sent, as JSON.

usage: python tools/e2e/claude_run.py [--mode plain|progress|tool|overflow] [--timeout S]
                                       [--model NAME] [--no-bare] [--scratch DIR]
                                       [--server URL --server-log FILE | --fake [--fake-error S]]
Without ``--server`` or ``--fake`` it starts a server itself (``server_launch``: greedy by
default, debug log, ``--model-alias 'claude-*'``). Prints a JSON report; the exit code is 0
only on a pass. Needs ``tools/setup_e2e.sh`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from trioserve.testing import ServerProcess, serve_argv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import CONTEXT_LIMIT, MODEL, PROGRESS_HEADER, PROMPT, ClientRun  # noqa: E402
from recorder import Exchange  # noqa: E402
from serverlog import ANY_TEXT_LINE, normalized, read_back  # noqa: E402

CLAUDE = harness.NODE_BIN / "claude"
MODES = ("plain", "progress", "tool", "overflow")
SYSTEM_PROMPT = "You are a helpful assistant."
MAX_OUTPUT_TOKENS = 256
API_KEY = "trioserve-e2e-dummy-key"  # sent as x-api-key; the server runs without --api-key
TOOL = "Read"
TOOL_MARKER = "claude-tool-ok"
TOOL_FILE = "marker.txt"  # in the scratch project, holding TOOL_MARKER
# What Claude Code prints for a context overflow it recognises (Anthropic's own wording,
# "prompt is too long: N tokens > M maximum", or one of its list of other servers' wordings).
CLAUDE_OVERFLOW_LINE = "Prompt is too long"

# Claude Code options that keep its request small for a 135M model with an 8192-token context
# (2.1.328): 890 bytes of JSON and 44 prompt tokens instead of 49 KB and 12.7k tokens.
# --tools "": no tool definitions (`"tools": []` instead of twelve tools, 32 KB);
# --system-prompt: ours instead of its 7 KB one (it still adds two short system blocks of its
# own); --bare: no environment block either. That block (working directory, OS, today's date:
# 0.9 KB, ~230 tokens) comes as a trailing `role: "system"` message after the prompt; SmolLM2
# answers it instead of the question, and since it holds the date and the scratch path, not
# always in the same number of tokens (an answer that reaches max_tokens makes Claude Code ask
# to continue three times, then exit 1). --bare also writes nothing under HOME and drops the
# DeferredToolPlaceholder tool that --tools Read would bring (`defer_loading: true`).
SMALL_REQUEST_ARGS = ("--bare", "--tools", "", "--system-prompt", SYSTEM_PROMPT)
# The tool run: one tool, allowed outright (-p cannot ask; a Read outside the project would
# otherwise come back as a permission error in the tool_result).
TOOL_REQUEST_ARGS = ("--bare", "--tools", TOOL, "--allowedTools", TOOL)
TOOL_REQUEST_ARGS += ("--system-prompt", SYSTEM_PROMPT)
SMALL_REQUEST_ENV = {
    # max_tokens: 256 instead of 32000 (128000 for its default claude-* model).
    "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
    # The real window. Without it Claude Code warns that it does not recognise the model and
    # assumes 1M tokens; with it, a request over the window is refused before it is sent.
    "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(CONTEXT_LIMIT),
}
# What keeps every run contained, offline and strict.
RUN_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # telemetry, error reports, update checks
    "CLAUDE_CODE_MAX_RETRIES": "0",  # fail at once: no backoff loop on 401/429/5xx/529
    # A stream Claude Code cannot use is an error, not a silent non-streamed second request.
    "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",
}
RUN_ARGS = ("-p", "--no-session-persistence")


def tool_prompt(path: Path) -> str:
    """SmolLM2 does not call a tool on its own (Claude Code sends no tool_choice). Asked to
    repeat a call in the <tool_call> form its chat template teaches, it does (greedy)."""
    call = json.dumps({"name": TOOL, "arguments": {"file_path": str(path)}})
    return f"Repeat exactly this text and nothing else:\n<tool_call>\n{call}\n</tool_call>"


def claude_args(mode: str, model: str | None, marker: Path, *, bare: bool = True) -> list[str]:
    """The command line after ``claude``, for one mode (``bare=False``: without --bare)."""
    args = list(RUN_ARGS)
    if model:
        args += ["--model", model]
    if mode == "tool":
        args += TOOL_REQUEST_ARGS
    elif mode != "overflow":  # overflow: Claude Code's own default request
        args += SMALL_REQUEST_ARGS
    if not bare and "--bare" in args:
        args.remove("--bare")
    return [*args, "--", tool_prompt(marker) if mode == "tool" else PROMPT]


def claude_env(scratch: Path, base_url: str, sink_port: int, mode: str) -> dict[str, str]:
    """A closed environment: nothing inherited but PATH."""
    sink = f"http://127.0.0.1:{sink_port}"
    env = harness.scratch_env(
        {"HOME": scratch / "home", "TMPDIR": scratch / "tmp"},
        ANTHROPIC_BASE_URL=base_url,
        ANTHROPIC_API_KEY=API_KEY,
        # Anything that is not the loopback server goes to the sink (and is refused there).
        HTTPS_PROXY=sink,
        HTTP_PROXY=sink,
        NO_PROXY="127.0.0.1,localhost",
        **RUN_ENV,
    )
    if mode != "overflow":
        env.update(SMALL_REQUEST_ENV)
    if mode == "progress":
        env["ANTHROPIC_CUSTOM_HEADERS"] = f"{PROGRESS_HEADER}: true"
    return env


def server_launch(port: int) -> list[str]:
    """argv of the server the Claude Code runs use: `trioserve serve` greedy by default
    (Claude Code sends no temperature), its debug log (the generated text of each request),
    progress every 0.5 s, and Claude Code's claude-* names mapped to the served model."""
    return serve_argv(
        port,
        "--log-level",
        "debug",
        "--default-temperature",
        "0",
        "--heartbeat-interval",
        "0.5",
        "--model-alias",
        "claude-*",
    )


def start_claude_server(folder: Path, **options) -> ServerProcess:
    """A healthy ``server_launch`` server on a free port, logging to ``folder/server.log``."""
    return harness.start_logged_server(folder, _launch, name="trioserve", **options)


def _launch(port: int) -> tuple[list[str], None]:
    return server_launch(port), None


@dataclass(kw_only=True)
class ClaudeRun(ClientRun):
    mode: str
    prompt: str
    argv: list[str]
    outside: list[str] = field(default_factory=list)  # first lines of connections to the sink
    marker: str | None = None
    fake_error: str | None = None  # the error FakeMessages answered with, if any


class Sink:
    """A stand-in proxy for everything that is not the loopback server: it keeps each
    connection's first line (``CONNECT api.anthropic.com:443 HTTP/1.1``) and refuses it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_tcp, self._refuse, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _refuse(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(5):
            while b"\n" not in data and len(data) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        self.lines.append(data.split(b"\r\n")[0].decode("latin-1"))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()


async def run_claude(
    upstream_port: int,
    scratch: Path,
    *,
    mode: str,
    timeout_s: float,
    model: str | None = MODEL,
    prompt: str | None = None,
    bare: bool = True,
    fake_error: str | None = None,
) -> ClaudeRun:
    """One ``claude -p PROMPT`` in the scratch project, through a Recorder to the server."""
    harness.require_client(CLAUDE)
    project = scratch / "project"
    project.mkdir(parents=True, exist_ok=True)
    marker = project / TOOL_FILE
    marker.write_text(TOOL_MARKER + "\n")
    sink = Sink()
    args = claude_args(mode, model, marker, bare=bare)
    if prompt is not None:
        args[-1] = prompt
    argv = [str(CLAUDE), *args]
    async with harness.relayed(upstream_port, scratch / "claude") as relay:
        sink_port = await relay.nursery.start(sink.serve)
        env = claude_env(scratch, f"http://127.0.0.1:{relay.port}", sink_port, mode)
        await relay.run(argv, cwd=project, env=env, timeout_s=timeout_s)
    return ClaudeRun(
        mode=mode,
        prompt=args[-1],
        argv=[Path(argv[0]).name, *args],
        **relay.outcome(),
        outside=list(sink.lines),
        marker=str(marker),
        fake_error=fake_error,
    )


# -- reading the wire --------------------------------------------------------------------------


def assemble(events: list[dict]) -> dict:
    """The message a stream carried: id, content blocks (text joined, tool input parsed),
    stop_reason, usage, as a client assembles them."""
    message: dict = {"id": None, "blocks": [], "stop_reason": None, "usage": {}}
    blocks: dict[int, dict] = {}
    partial_json: dict[int, str] = {}
    for e in events:
        kind = e.get("type")
        if kind == "message_start":
            start = e.get("message") or {}
            message["id"] = start.get("id")
            message["usage"].update(start.get("usage") or {})
        elif kind == "content_block_start":
            blocks[e.get("index")] = dict(e.get("content_block") or {})
        elif kind == "content_block_delta":
            block, delta = blocks.get(e.get("index")), e.get("delta") or {}
            if block is None:
                continue
            if delta.get("type") == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif delta.get("type") == "input_json_delta":
                i = e.get("index")
                partial_json[i] = partial_json.get(i, "") + delta.get("partial_json", "")
            elif delta.get("type") == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
        elif kind == "message_delta":
            message["stop_reason"] = (e.get("delta") or {}).get("stop_reason")
            message["usage"].update(e.get("usage") or {})
    for i, text in partial_json.items():
        try:
            blocks[i]["input"] = json.loads(text) if text else {}
        except ValueError:
            blocks[i]["input"] = {"unparseable": text}
    message["blocks"] = [blocks[i] for i in sorted(blocks, key=lambda k: (k is None, k))]
    return message


def _text(blocks: list[dict]) -> str:
    return "".join(b.get("text") or "" for b in blocks if b.get("type") == "text")


def _block_text(content: object) -> str:
    """A tool_result's content (a string or text blocks) as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text") or "" for b in content if isinstance(b, dict))
    return ""


def describe(exchange: Exchange, texts: dict[str, str]) -> dict:
    """What one POST /v1/messages carried and got back."""
    body = exchange.request_json() or {}
    events = harness.stream_events(exchange) if exchange.status == 200 else []
    message = assemble(events)
    messages = body.get("messages") or []
    results = _tool_results(messages)
    headers = exchange.request_headers
    return {
        "target": exchange.target,
        "status": exchange.status,
        "complete": exchange.complete,
        "request_bytes": len(exchange.request_body),
        "model": body.get("model"),
        "max_tokens": body.get("max_tokens"),
        "stream": body.get("stream"),
        "tools": [t.get("name") or t.get("type") for t in body.get("tools") or []],
        "tool_choice": body.get("tool_choice"),
        "thinking": body.get("thinking"),
        "roles": [m.get("role") for m in messages],
        "tool_results": [
            {
                "tool_use_id": r.get("tool_use_id"),
                "is_error": r.get("is_error", False),
                "content": _block_text(r.get("content")),
            }
            for r in results
        ],
        "anthropic_version": headers.get("anthropic-version"),
        "anthropic_beta": headers.get("anthropic-beta"),
        "x_api_key": headers.get("x-api-key") is not None,
        "progress_header": headers.get(PROGRESS_HEADER.lower()),
        "event_types": [e.get("type") or e.get("_event") for e in events],
        "progress_events": sum(harness.is_progress(e) for e in events),
        "error_events": [e for e in events if e.get("type") == "error"],
        "error_body": harness.error_body(exchange),
        "message_id": message["id"],
        "stop_reason": message["stop_reason"],
        "usage": message["usage"],
        "tool_uses": [
            {"id": b.get("id"), "name": b.get("name"), "input": b.get("input")}
            for b in message["blocks"]
            if b.get("type") == "tool_use"
        ],
        "wire_text": _text(message["blocks"]),
        "logged_text": texts.get(message["id"]) if message["id"] else None,
    }


def _tool_results(messages: list[dict]) -> list[dict]:
    """The tool_result blocks of a request's messages."""
    return [
        b
        for m in messages
        if isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]


def _messages_exchanges(run: ClaudeRun) -> list[Exchange]:
    return [
        e
        for e in run.exchanges
        if e.method == "POST" and urlsplit(e.target).path.rstrip("/") == "/v1/messages"
    ]


def _waiting(request: dict) -> bool:
    return bool(request["message_id"]) and request["logged_text"] is None


def verdict(run: ClaudeRun, server_log: Path) -> dict:
    """The report: every check that failed is a reason; ok when there is none."""
    exchanges = _messages_exchanges(run)
    requests = read_back(server_log, exchanges, describe, waiting=_waiting, line=ANY_TEXT_LINE)
    reasons = harness.timeout_reasons("claude", run)
    others = [f"{e.method} {e.target}" for e in run.exchanges if e not in exchanges]
    if run.outside:
        reasons.append(f"claude tried to reach the network: {run.outside}")
    if not requests:
        reasons.append(f"no POST /v1/messages among {len(run.exchanges)} request(s): {others}")
    elif run.fake_error:
        reasons += _error_reasons(run, requests)
    elif run.mode == "overflow":
        reasons += _overflow_reasons(run, requests)
    else:
        reasons += _answer_reasons(run, requests)
    head = {"mode": run.mode, "argv": run.argv, "prompt": run.prompt}
    tail = {"other_requests": others, "outside_connections": run.outside, "requests": requests}
    return harness.report(run, reasons, head, tail)


def _answer_reasons(run: ClaudeRun, requests: list[dict]) -> list[str]:
    reasons = harness.exit_reasons("claude", run)
    for r in requests:
        if r["status"] != 200:
            reasons.append(f"a request got HTTP {r['status']}: {r['error_body']}")
        if r["stream"] is not True:
            reasons.append(f"a request was not streamed (stream={r['stream']!r})")
        if r["error_events"]:
            reasons.append(f"an error event reached claude: {r['error_events'][0]}")
        if r["status"] == 200 and "message_stop" not in r["event_types"]:
            reasons.append(f"a stream had no message_stop: {r['event_types']}")
    final = requests[-1]
    reasons += harness.last_answer_reasons(
        "claude", run, final, id_key="message_id", id_name="message"
    )
    reasons += harness.progress_reasons(run.mode == "progress", requests)
    if run.mode == "tool":
        reasons += _tool_reasons(run, requests)
    return reasons


def _tool_reasons(run: ClaudeRun, requests: list[dict]) -> list[str]:
    first = requests[0]
    if first["tools"] != [TOOL] and TOOL not in first["tools"]:
        return [f"the request does not offer {TOOL}: {first['tools']}"]
    uses = first["tool_uses"]
    if not uses:
        return [f"the model did not call a tool; it said {first['wire_text']!r}"]
    use = uses[0]
    reasons = []
    if use["name"] != TOOL:
        reasons.append(f"the model called {use['name']!r}, not {TOOL!r}")
    if first["stop_reason"] != "tool_use":
        reasons.append(f"the tool call's stop_reason is {first['stop_reason']!r}, not tool_use")
    path = (use["input"] or {}).get("file_path") if isinstance(use["input"], dict) else None
    if path != run.marker:
        reasons.append(f"the model's file_path is {path!r}, not {run.marker!r}")
    if len(requests) < 2:
        return [*reasons, "claude sent no request after the tool call"]
    results = [r for req in requests[1:] for r in req["tool_results"]]
    mine = [r for r in results if r["tool_use_id"] == use["id"]]
    if not mine:
        reasons.append(f"no tool_result for tool_use_id {use['id']!r}: {results}")
    elif mine[0]["is_error"] or TOOL_MARKER not in mine[0]["content"]:
        reasons.append(f"the tool_result is not the file's content: {mine[0]}")
    return reasons


def _overflow_reasons(run: ClaudeRun, requests: list[dict]) -> list[str]:
    """Claude Code's default request is over the context: a 400 that Claude Code shows."""
    reasons = []
    if run.returncode == 0:
        reasons.append("claude exited 0 although its request is over the model's context")
    # A 400 whose message Claude Code does not recognise as an overflow is re-sent twice with
    # fewer betas; one it recognises ("prompt is too long: N tokens > M maximum") is not.
    if len(requests) > 3:
        reasons.append(f"claude sent {len(requests)} requests, not 1 to 3 (retried?)")
    for r in requests:
        if r["status"] != 400:
            reasons.append(f"an over-long request got HTTP {r['status']}, not 400")
    first = requests[0]
    body = first["error_body"] or {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = error.get("message")
    if body.get("type") != "error" or error.get("type") != "invalid_request_error":
        reasons.append(f"the 400 is not Anthropic's invalid_request_error shape: {body}")
    if not message:
        reasons.append(f"the 400 has no error.message: {body}")
    shown = normalized(run.stdout + run.stderr)
    if message and normalized(message) not in shown and CLAUDE_OVERFLOW_LINE not in shown:
        reasons.append(f"claude does not show the error (message {message!r})")
    return reasons


# Claude Code 2.1.328 (retries and the non-streamed fallback off, as here) on an error answer:
# how many requests it sends, and whether it shows our message (else a text of its own).
FAKE_ERROR_BEHAVIOUR = {
    "400": (3, True),  # re-sent twice with fewer betas / thinking fields, then shown
    "401": (1, True),  # "Failed to authenticate. API Error: 401 <message>"
    "404": (
        2,
        False,
    ),  # re-sent once with stream: false; "There's an issue with the selected model"
    "413": (1, False),  # "Request too large (max 32MB). ..."
    "429": (1, True),  # "API Error: Request rejected (429) · <message>"
    "500": (1, True),  # "API Error: 500 <message>. This is a server-side issue, ..."
    "529": (1, True),
    "event": (1, True),  # "API Error: <message>"
}


def _error_reasons(run: ClaudeRun, requests: list[dict]) -> list[str]:
    """An error answer (``--fake-error``): Claude Code exits non-zero and says so."""
    reasons = []
    if run.returncode == 0:
        reasons.append("claude exited 0 after an error answer")
    count, shows_ours = FAKE_ERROR_BEHAVIOUR[str(run.fake_error)]
    if len(requests) != count:
        reasons.append(f"claude sent {len(requests)} requests, not {count}")
    if run.fake_error == "event":
        events = [e for r in requests for e in r["error_events"]]
        message = events[0]["error"]["message"] if events else None
    else:
        message = ((requests[0]["error_body"] or {}).get("error") or {}).get("message")
    if not message:
        reasons.append("no error reached claude")
    elif shows_ours and normalized(message) not in normalized(run.stdout + run.stderr):
        reasons.append(f"claude does not show the error's message {message!r}")
    return reasons


# -- a hand-written Messages stream, to check the harness without trioserve -------------------


class FakeMessages(harness.FakeServer):
    """The smallest ``/v1/messages`` streams Claude Code accepts, plus the progress form we
    expect, and Anthropic's error answers on demand.

    A request whose messages hold a ``tool_result`` gets a text answer quoting it; a prompt
    holding a ``<tool_call>`` gets that call as a ``tool_use`` block; a body over 30 KB gets a
    400 ``prompt is too long``; anything else, a fixed answer. Each answer's text is logged the
    way trioserve logs it, so ``verdict`` reads it back. ``error`` (an HTTP status, or
    ``"event"``) answers every request with that error instead.
    """

    ANSWER = "The capital of France is Paris."

    def __init__(self, log_path: Path, error: str | None = None) -> None:
        super().__init__(log_path)
        self.error = error

    def answer(self, path: str, raw: bytes, progress: bool) -> tuple[int, bytes, str]:
        n = self.next_number()
        if urlsplit(path).path != "/v1/messages":
            return _error(404, f"fake: no route for {path}")
        body = json.loads(raw)
        if self.error and self.error != "event":
            return _error(int(self.error), f"fake {self.error}: the server says no")
        if len(raw) > 30_000:
            return _error(400, f"prompt is too long: {len(raw) // 4} tokens > 8192 maximum")
        messages = body.get("messages") or []
        results = _tool_results(messages)
        call = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", _user_text(messages), re.S)
        if results:
            # Read's result is the file numbered by line: "1\tclaude-tool-ok\n2\t"
            lines = _block_text(results[-1].get("content")).splitlines()
            said = [line.split("\t", 1)[-1] for line in lines if line.split("\t", 1)[-1]]
            blocks = [{"type": "text", "text": f"The file says {' '.join(said)}."}]
        elif call:
            parsed = json.loads(call.group(1))
            blocks = [
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{n}",
                    "name": parsed["name"],
                    "input": parsed.get("arguments") or {},
                }
            ]
        else:
            blocks = [{"type": "text", "text": self.ANSWER}]
        message_id = f"msg_fake{n}"
        if self.error != "event":
            self.log_text(n, message_id, _text(blocks))
        if body.get("stream") is not True:
            return 200, json.dumps(_message(message_id, body, blocks)).encode(), "application/json"
        events = _stream(message_id, body, blocks, progress, error=self.error == "event")
        return 200, events.encode(), "text/event-stream"


def _user_text(messages: list[dict]) -> str:
    out = []
    for m in messages:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        out.append(content if isinstance(content, str) else _block_text(content))
    return "\n".join(out)


def _error(status: int, message: str) -> tuple[int, bytes, str]:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    body = {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    return status, json.dumps(body).encode(), "application/json"


def _message(message_id: str, body: dict, blocks: list[dict]) -> dict:
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 16, "output_tokens": 8},
    }


def _stream(
    message_id: str, body: dict, blocks: list[dict], progress: bool, *, error: bool = False
) -> str:
    """A comment, message_start, ping, progress, each block's start/delta/stop,
    message_delta, message_stop: what Claude Code needs (it needs message_start,
    content_block_start and content_block_stop, and message_delta or message_stop)."""
    start = {**_message(message_id, body, []), "stop_reason": None}
    start["usage"] = {"input_tokens": 16, "output_tokens": 0}
    events: list[tuple[str, dict]] = [("message_start", {"message": start}), ("ping", {})]
    if progress:
        fields = {"status": "processing", "n_past": 8, "n_prompt_tokens": 16, "fraction": 0.5}
        events.append(("prefill_progress", {"message_id": message_id, **fields}))
    if error:
        overloaded = {"type": "overloaded_error", "message": "fake: an error event"}
        events.append(("error", {"error": overloaded}))
        blocks = []
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            events.append(("content_block_start", {"index": i, "content_block": _empty(block)}))
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            events.append(("content_block_start", {"index": i, "content_block": _empty(block)}))
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events.append(("content_block_delta", {"index": i, "delta": delta}))
        events.append(("content_block_stop", {"index": i}))
    if not error:
        stop = _message(message_id, body, blocks)["stop_reason"]
        delta = {"stop_reason": stop, "stop_sequence": None}
        events.append(("message_delta", {"delta": delta, "usage": {"output_tokens": 8}}))
        events.append(("message_stop", {}))
    out = [": the fake's comment line, which claude must skip\n\n"]
    for name, data in events:
        out.append(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n")
    return "".join(out)


def _empty(block: dict) -> dict:
    if block["type"] == "text":
        return {"type": "text", "text": ""}
    return {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}


# -- requests as fixtures ----------------------------------------------------------------------


def request_fixture(exchange: Exchange, scratch: Path) -> dict:
    """One request as JSON, the scratch folder's path and the relay's port made neutral."""
    return harness.request_fixture(exchange, _neutral(scratch))


def _neutral(scratch: Path) -> list[tuple[str, str]]:
    # Claude Code's per-project folder names are the path with "-" for "/" and ".".
    return [(str(scratch), "/scratch"), (re.sub(r"[^A-Za-z0-9]", "-", str(scratch)), "-scratch")]


def save_requests(run: ClaudeRun, scratch: Path, folder: Path) -> list[str]:
    return harness.save_requests(_messages_exchanges(run), run.mode, folder, _neutral(scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="plain")
    harness.add_target_args(parser, fake_help="a hand-written Messages stream")
    parser.add_argument(
        "--fake-error",
        choices=["400", "401", "404", "413", "429", "500", "529", "event"],
        help="with --fake: answer every request with this error",
    )
    parser.add_argument(
        "--model",
        default=MODEL,
        help=f"claude --model (default {MODEL}); '' for Claude Code's own claude-* default",
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds (default 180)")
    parser.add_argument("--scratch", type=Path, help="HOME, TMPDIR and project (kept)")
    parser.add_argument("--prompt", help="instead of the mode's prompt")
    parser.add_argument(
        "--no-bare",
        dest="bare",
        action="store_false",
        help="leave --bare out (Claude Code then adds its environment block)",
    )
    parser.add_argument("--save-requests", type=Path, metavar="DIR", help="write them as JSON")
    args = parser.parse_args(argv)
    harness.check_target_args(parser, args)
    if args.fake_error and not args.fake:
        parser.error("--fake-error needs --fake")
    scratch = harness.scratch_folder(args.scratch, "trioserve-claude-")
    with contextlib.ExitStack() as stack:
        fake = partial(FakeMessages, error=args.fake_error)
        port, log_path = harness.open_target(
            stack, parser, args, scratch, start=start_claude_server, fake=fake
        )
        run = trio.run(
            partial(
                run_claude,
                port,
                scratch,
                mode=args.mode,
                timeout_s=args.timeout,
                model=args.model or None,
                prompt=args.prompt,
                bare=args.bare,
                fake_error=args.fake_error,
            )
        )
        report = verdict(run, log_path)
    saved = save_requests(run, scratch, args.save_requests) if args.save_requests else None
    return harness.finish(report, scratch, saved)


if __name__ == "__main__":
    sys.exit(main())
