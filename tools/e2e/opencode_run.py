"""Run the real OpenCode CLI against a live trioserve and check it shows what the server generated.

OpenCode is the strictest client people point at local servers: the Vercel AI SDK under it
validates every chunk, and it retries a broken stream forever. "Any output" proves little, so
a run passes only when:

- ``opencode run`` exits 0 within the timeout;
- its agent turn (the chat request that carries tools) got a streamed answer whose
  ``chatcmpl-`` id the server logged with the generated text (``--log-level debug``);
- OpenCode's output contains that text;
- no stream carried an error chunk;
- with ``--progress``: every chat request carried ``X-SwiftLM-Prefill-Progress: true`` (set
  through the provider's ``headers`` option) and the agent turn's stream really held
  ``event: prefill_progress`` events, so they reached OpenCode and it still finished.

The wire facts come from ``recorder.Recorder``, a loopback relay between OpenCode and the server.
Everything stays offline and contained: HOME and the XDG folders in a scratch directory, the
project ``opencode.json`` found through ``$PWD``, no inherited environment (no stray API keys),
and npm forced offline (OpenCode installs ``@opencode-ai/plugin`` into its config folder in the
background; offline, that fails at once and the run goes on).

usage: python tools/e2e/opencode_run.py [--progress] [--timeout S] [--scratch DIR]
                                         [--server URL --server-log FILE]
Without ``--server`` it starts ``trioserve serve --log-level debug`` on a free port itself.
Prints a JSON report; the exit code is 0 only on a pass. Needs ``tools/setup_e2e.sh`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from trioserve.testing import running_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorder import Exchange, Recorder  # noqa: E402
from serverlog import logged_texts, normalized  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OPENCODE = Path(__file__).resolve().parent / "node_modules" / ".bin" / "opencode"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "What is the capital of France?"
# The server this starts without --server: debug logs hold the generated text (serverlog.py).
SERVER_ARGS = ("--log-level", "debug", "--heartbeat-interval", "0.5")
PROGRESS_HEADER = "X-SwiftLM-Prefill-Progress"
OUTPUT_LIMIT = 64  # without limit.output OpenCode asks for 32000 tokens
CONTEXT_LIMIT = 8192  # SmolLM2's max_position_embeddings
# Denied tools are left out of the request. Those that run commands, write or reach the network
# must go; task, todowrite and skill go too, for time: their definitions are ~2000 of the ~5200
# prompt tokens of the agent turn (measured with SmolLM2's template), and prefill on a CPU costs.
# glob, grep and read stay, so the turn still carries tools and tool_choice "auto"; they "ask",
# which `opencode run` answers with an automatic rejection.
DENIED_TOOLS = ("bash", "edit", "webfetch", "websearch", "codesearch", "task", "todowrite", "skill")


def opencode_config(base_url: str, progress: bool) -> dict:
    """A project opencode.json: one OpenAI-compatible provider, our model for every agent."""
    options: dict = {"baseURL": base_url, "apiKey": "unused"}
    if progress:
        options["headers"] = {PROGRESS_HEADER: "true"}
    return {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "model": f"trioserve/{MODEL}",
        "small_model": f"trioserve/{MODEL}",
        "enabled_providers": ["trioserve"],
        "provider": {
            "trioserve": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "trioserve",
                "options": options,
                "models": {
                    MODEL: {
                        "name": "SmolLM2 135M Instruct",
                        "temperature": True,
                        "limit": {"context": CONTEXT_LIMIT, "output": OUTPUT_LIMIT},
                    }
                },
            }
        },
        # Greedy decoding: the same prompt gives the same answer.
        "agent": {"build": {"temperature": 0}, "title": {"temperature": 0}},
        "permission": {"*": "ask", **dict.fromkeys(DENIED_TOOLS, "deny")},
    }


def opencode_env(scratch: Path, project: Path) -> dict[str, str]:
    """A closed environment: nothing inherited but PATH."""
    dirs = {
        "HOME": scratch / "home",
        "XDG_CONFIG_HOME": scratch / "xdg" / "config",
        "XDG_DATA_HOME": scratch / "xdg" / "data",
        "XDG_CACHE_HOME": scratch / "xdg" / "cache",
        "XDG_STATE_HOME": scratch / "xdg" / "state",
        "TMPDIR": scratch / "tmp",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        **{name: str(path) for name, path in dirs.items()},
        "PWD": str(project),  # OpenCode finds its project (and opencode.json) from $PWD
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "npm_config_offline": "true",
        "NO_COLOR": "1",
    }


@dataclass
class OpenCodeRun:
    returncode: int | None
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str
    exchanges: list[Exchange] = field(default_factory=list)


async def _kill_group(process: trio.Process) -> None:
    """OpenCode may start helpers: end its whole process group (it has its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_opencode(
    upstream_port: int, scratch: Path, *, progress: bool, timeout_s: float, prompt: str = PROMPT
) -> OpenCodeRun:
    """One ``opencode run`` with the prompt on stdin, talking to the server through a Recorder."""
    if not os.access(OPENCODE, os.X_OK):
        raise FileNotFoundError(f"{OPENCODE} is missing: run tools/setup_e2e.sh")
    project = scratch / "project"
    project.mkdir(parents=True, exist_ok=True)
    env = opencode_env(scratch, project)
    recorder = Recorder(upstream_port)
    stdout_path, stderr_path = scratch / "opencode.stdout", scratch / "opencode.stderr"
    returncode = None
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(recorder.serve)
        config = opencode_config(f"http://127.0.0.1:{port}/v1", progress)
        (project / "opencode.json").write_text(json.dumps(config, indent=2))
        argv = [str(OPENCODE), "run", "--print-logs", "--log-level", "INFO"]
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            with trio.move_on_after(timeout_s) as deadline:
                done = await trio.run_process(
                    argv,
                    stdin=prompt.encode(),
                    stdout=out,
                    stderr=err,
                    check=False,
                    cwd=project,
                    env=env,
                    start_new_session=True,
                    deliver_cancel=_kill_group,
                )
                returncode = done.returncode
        nursery.cancel_scope.cancel()
    return OpenCodeRun(
        returncode=returncode,
        timed_out=deadline.cancelled_caught,
        seconds=round(time.monotonic() - started, 1),
        stdout=stdout_path.read_text(errors="replace"),
        stderr=stderr_path.read_text(errors="replace"),
        exchanges=recorder.exchanges(),
    )


def _describe(exchange: Exchange, texts: dict[str, str]) -> dict:
    body = exchange.request_json() or {}
    chunks = exchange.chunks()
    ids = sorted({c["id"] for c in chunks if isinstance(c.get("id"), str)})
    wire_text = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for c in chunks
        for choice in c.get("choices") or []
    )
    return {
        "target": exchange.target,
        "status": exchange.status,
        "complete": exchange.complete,
        "tools": [t.get("function", {}).get("name") for t in body.get("tools") or []],
        "tool_choice": body.get("tool_choice"),
        "max_tokens": body.get("max_tokens"),
        "stream_options": body.get("stream_options"),
        "progress_header": exchange.request_headers.get(PROGRESS_HEADER.lower()),
        "progress_events": sum(e.name == "prefill_progress" for e in exchange.sse_events()),
        "error_chunks": [c for c in chunks if "error" in c],
        "ids": ids,
        "wire_text": wire_text,
        "logged_text": texts.get(ids[0]) if len(ids) == 1 else None,
    }


def verdict(run: OpenCodeRun, server_log: Path, *, progress: bool) -> dict:
    """The report: every check that failed is a reason; ok when there is none."""
    chats = [e for e in run.exchanges if e.target.endswith("/chat/completions")]
    # The server writes its text line as the stream ends; give the log a moment to catch up.
    deadline = time.monotonic() + 10
    while True:
        texts = logged_texts(server_log.read_text(errors="replace"))
        requests = [_describe(e, texts) for e in chats]
        if time.monotonic() > deadline or all(r["logged_text"] is not None for r in requests):
            break
        time.sleep(0.2)
    reasons = []
    if run.timed_out:
        reasons.append(f"opencode did not finish in time ({run.seconds} s)")
    elif run.returncode != 0:
        reasons.append(f"opencode exited with {run.returncode}")
    agent = [r for r in requests if r["tools"]]
    if not agent:
        reasons.append(f"no chat request with tools among {len(requests)} chat request(s)")
    else:
        turn = agent[-1]
        text = turn["logged_text"]
        if text is None:
            reasons.append(f"no server log line for the agent turn's stream (ids {turn['ids']})")
        elif not text.strip():
            reasons.append("the server generated an empty answer: nothing to find in the output")
        elif normalized(text) not in normalized(run.stdout):
            reasons.append("opencode's output does not contain the text the server generated")
        if progress and turn["progress_events"] < 1:
            reasons.append("the agent turn's stream held no prefill_progress event")
    for r in requests:
        if r["error_chunks"]:
            reasons.append(f"an error chunk reached the client: {r['error_chunks'][0]}")
        if progress and (r["progress_header"] or "").lower() != "true":
            reasons.append(f"a chat request lacked the {PROGRESS_HEADER} header")
    return {
        "ok": not reasons,
        "reasons": reasons,
        "progress": progress,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "seconds": run.seconds,
        "stdout": run.stdout,
        "stderr_tail": run.stderr[-4000:],
        "requests": requests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="a running trioserve, e.g. http://127.0.0.1:8080")
    parser.add_argument("--server-log", type=Path, help="its log, written with --log-level debug")
    parser.add_argument("--progress", action="store_true", help=f"send {PROGRESS_HEADER}: true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    parser.add_argument("--scratch", type=Path, help="HOME, XDG folders and project (kept)")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)
    if bool(args.server) != bool(args.server_log):
        parser.error("--server and --server-log go together")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="trioserve-opencode-"))
    scratch.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.server:
            url, log_path = args.server, args.server_log
        else:
            log_path = scratch / "server.log"
            server = running_server(*SERVER_ARGS, log_path=log_path, cwd=ROOT, die_with_parent=True)
            url = stack.enter_context(server).url
        port = urlsplit(url).port
        if urlsplit(url).hostname != "127.0.0.1" or port is None:
            parser.error("--server must be http://127.0.0.1:PORT")
        run = trio.run(
            partial(
                run_opencode,
                port,
                scratch,
                progress=args.progress,
                timeout_s=args.timeout,
                prompt=args.prompt,
            )
        )
        report = verdict(run, log_path, progress=args.progress)
    report["scratch"] = str(scratch)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
