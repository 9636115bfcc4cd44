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
import sys
from functools import partial
from pathlib import Path

import trio

from trioserve.testing import ServerProcess, serve_argv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import CONTEXT_LIMIT, MODEL, PROGRESS_HEADER, PROMPT, ClientRun  # noqa: E402
from recorder import Exchange  # noqa: E402
from serverlog import read_back  # noqa: E402

OPENCODE = harness.NODE_BIN / "opencode"
# The server this starts without --server: debug logs hold the generated text (serverlog.py).
SERVER_ARGS = ("--log-level", "debug", "--heartbeat-interval", "0.5")
OUTPUT_LIMIT = 64  # without limit.output OpenCode asks for 32000 tokens
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
    return harness.scratch_env(
        dirs,
        PWD=str(project),  # OpenCode finds its project (and opencode.json) from $PWD
        OPENCODE_DISABLE_AUTOUPDATE="1",
        OPENCODE_DISABLE_MODELS_FETCH="1",
        OPENCODE_DISABLE_SHARE="1",
        OPENCODE_DISABLE_LSP_DOWNLOAD="1",
        npm_config_offline="true",
    )


def start_opencode_server(folder: Path, **options) -> ServerProcess:
    """``trioserve serve SERVER_ARGS`` on a free port, logging to ``folder/server.log``."""
    return harness.start_logged_server(folder, _launch, **options)


def _launch(port: int) -> tuple[list[str], None]:
    return serve_argv(port, *SERVER_ARGS), None


OpenCodeRun = ClientRun  # OpenCode's run holds nothing of its own


async def run_opencode(
    upstream_port: int, scratch: Path, *, progress: bool, timeout_s: float, prompt: str = PROMPT
) -> OpenCodeRun:
    """One ``opencode run`` with the prompt on stdin, talking to the server through a Recorder."""
    harness.require_client(OPENCODE)
    project = scratch / "project"
    project.mkdir(parents=True, exist_ok=True)
    env = opencode_env(scratch, project)
    async with harness.relayed(upstream_port, scratch / "opencode") as relay:
        config = opencode_config(f"http://127.0.0.1:{relay.port}/v1", progress)
        (project / "opencode.json").write_text(json.dumps(config, indent=2))
        argv = [str(OPENCODE), "run", "--print-logs", "--log-level", "INFO"]
        await relay.run(argv, cwd=project, env=env, timeout_s=timeout_s, stdin=prompt.encode())
    return OpenCodeRun(**relay.outcome())


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
    requests = read_back(server_log, chats, _describe, waiting=lambda r: r["logged_text"] is None)
    reasons = harness.timeout_reasons("opencode", run) + harness.exit_reasons("opencode", run)
    agent = [r for r in requests if r["tools"]]
    if not agent:
        reasons.append(f"no chat request with tools among {len(requests)} chat request(s)")
    else:
        turn = agent[-1]
        missing = f"no server log line for the agent turn's stream (ids {turn['ids']})"
        reasons += harness.shown_text_reasons(
            "opencode", turn["logged_text"], run.stdout, missing=missing
        )
        if progress and turn["progress_events"] < 1:
            reasons.append("the agent turn's stream held no prefill_progress event")
    for r in requests:
        if r["error_chunks"]:
            reasons.append(f"an error chunk reached the client: {r['error_chunks'][0]}")
        if progress and (r["progress_header"] or "").lower() != "true":
            reasons.append(f"a chat request lacked the {PROGRESS_HEADER} header")
    return harness.report(run, reasons, {"progress": progress}, {"requests": requests})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_target_args(parser)
    parser.add_argument("--progress", action="store_true", help=f"send {PROGRESS_HEADER}: true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    parser.add_argument("--scratch", type=Path, help="HOME, XDG folders and project (kept)")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)
    harness.check_target_args(parser, args)
    scratch = harness.scratch_folder(args.scratch, "trioserve-opencode-")
    with contextlib.ExitStack() as stack:
        port, log_path = harness.open_target(
            stack, parser, args, scratch, start=start_opencode_server
        )
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
    return harness.finish(report, scratch)


if __name__ == "__main__":
    sys.exit(main())
