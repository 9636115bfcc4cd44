"""Speculative decoding over HTTP: a code-edit workload and plain chat, on trioserve with
speculation off, prompt lookup, Predicted Outputs and a draft model, beside mlx-lm's own
server with and without its draft model (issue 18).

Why: drafting pays only where the answer repeats text the server can see (an edited file) or
where a small model guesses well; elsewhere it must not cost. This starts one trioserve
(``--parallel`` the largest stream count, speculation chosen per request with the
``speculation`` field, so every trioserve mode runs on the same process) and, unless
``--no-peer``, ``mlx_lm.server`` on the same weights, on OpenBLAS as tools/bench_server.py
runs it (LD_PRELOAD, the same OPENBLAS_NUM_THREADS, checked in /proc/PID/maps). With
``--draft-model SOURCE`` trioserve loads that model too (the "draft-model" column), and a
second peer runs with ``--draft-model`` ("peer draft-model"; mlx-lm turns batching off with a
draft model, so its concurrent streams are served one at a time). Peer requests carry no
trioserve-only fields.

Every request is streamed at temperature 0. Per workload and stream count (``--streams``,
1 and 8 by default) the table gives, for every column: decode tok/s (aggregate after the
first token), its ratio to trioserve with speculation off, inter-token latency p50/p95 counted
per token (tokens that arrive in one chunk or one read are 0 s apart), and the acceptance
rate of drafts (from trioserve's ``/metrics``; mlx_lm.server reports none). Columns run
interleaved, ``--repeat`` times, medians printed.

The edit workload asks for tests/fixtures/speculation/inventory.py back with a class
renamed, on /v1/completions with the chat template written out and the assistant's turn
opened with a code fence (an assistant prefill: asked in plain chat, this 135M model explains
the file instead of editing it); its prediction is that file with the rename done. The chat
workload is the story prompts of tools/bench_common.py on /v1/chat/completions.

Usage:
    .venv/bin/python tools/bench_speculation.py [--repeat 1] [--max-tokens 128] [--json OUT]
        [--streams 1 8] [--draft-model SOURCE [--draft-tokens N]] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio
from bench.client import StreamResult, stream_chat
from bench.servers import blas_env, check_blas, peer_server, trioserve_server
from bench_common import (
    ROOT,
    TokenTrace,
    aggregate_decode_rate,
    default_model_dir,
    fmt,
    load_average,
    machine_line,
    percentile,
    print_table,
    story_messages,
)

from trioserve.testing import ServerProcess

SOURCE = (ROOT / "tests" / "fixtures" / "speculation" / "inventory.py").read_text()
EDITED = SOURCE.replace("Inventory", "Stock")
# Columns: trioserve's speculation modes, then the peer's; which server answers each.
SERVER_OF = {
    "off": "trioserve",
    "prompt-lookup": "trioserve",
    "prediction": "trioserve",
    "draft-model": "trioserve",
    "peer off": "peer",
    "peer draft-model": "peer-draft",
}
FIGURES = ("tok/s", "x trioserve off", "ITL p50 ms", "ITL p95 ms", "acceptance")


# SmolLM2's chat template, written out (its default system prompt included).
TEMPLATE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n```python\n"
)


def _speculation_fields(column: str) -> dict[str, Any]:
    """What a request of ``column`` adds: nothing for the peer (plain OpenAI requests)."""
    if SERVER_OF[column] != "trioserve":
        return {}
    if column == "prediction":
        return {"prediction": {"type": "content", "content": EDITED}}
    return {"speculation": column}


def edit_prompt(nonce: str) -> str:
    """The edit workload's whole prompt (the chat template written out)."""
    ask = (
        f"[{nonce}] Rename the class `Inventory` to `Stock` in this file and return the whole file."
    )
    return TEMPLATE.format(user=f"{ask}\n\n```python\n{SOURCE}```")


def edit_body(max_tokens: int, column: str, nonce: str) -> dict[str, Any]:
    return {
        "prompt": edit_prompt(nonce),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_speculation_fields(column),
    }


def chat_body(max_tokens: int, column: str, nonce: str, index: int) -> dict[str, Any]:
    return {
        "messages": story_messages(index, nonce),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_speculation_fields(column),
    }


async def run_streams(base: str, bodies: list[dict[str, Any]]) -> list[StreamResult]:
    results = [StreamResult() for _ in bodies]
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        async with trio.open_nursery() as nursery:
            for body, result in zip(bodies, results, strict=True):
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                nursery.start_soon(
                    lambda b=body, r=result, p=path: stream_chat(
                        client, base, b, r, limit_s=900, path=p
                    )
                )
    for r in results:
        if r.error:
            raise SystemExit(f"a request failed: {r.error}")
    return results


def draft_counts(base: str) -> dict[str, tuple[float, float]]:
    """trioserve's drafted and accepted tokens so far, per method (from /metrics)."""
    text = httpx.get(base + "/metrics", timeout=30, trust_env=False).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("trioserve_speculative_"):
            continue
        method = line.split('method="', 1)[1].split('"', 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        pair = out.setdefault(method, [0.0, 0.0])
        pair[0 if "draft_tokens" in line else 1] = value
    return {m: (p, a) for m, (p, a) in out.items()}


def token_gaps(trace: TokenTrace) -> list[float]:
    """Inter-token gaps counted per token: a chunk that carries k tokens (by the server's
    usage count) adds k - 1 gaps of 0 s, as its tokens arrived together."""
    return trace.gaps() + [0.0] * max(0, trace.count - len(trace.token_times))


def figures(
    results: list[StreamResult], before: dict | None, after: dict | None, column: str
) -> dict[str, Any]:
    """One run's figures; ``before``/``after``: draft counts (None: the server has none)."""
    traces = [r.trace for r in results]
    gaps = [g for t in traces for g in token_gaps(t)]
    proposed = accepted = None
    if before is not None and after is not None:
        proposed = after.get(column, (0, 0))[0] - before.get(column, (0, 0))[0]
        accepted = after.get(column, (0, 0))[1] - before.get(column, (0, 0))[1]
    return {
        "tok_s": aggregate_decode_rate(traces),
        "itl_p50_ms": (percentile(gaps, 50) or 0) * 1000,
        "itl_p95_ms": (percentile(gaps, 95) or 0) * 1000,
        "tokens": sum(t.count for t in traces),
        "proposed": proposed,
        "accepted": accepted,
        "acceptance": accepted / proposed if proposed else None,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model dir (default: the embedded model)")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure (default 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="per request (default 128)")
    p.add_argument(
        "--streams", type=int, nargs="+", default=[1, 8], help="concurrent streams (default 1 8)"
    )
    p.add_argument(
        "--draft-model",
        metavar="SOURCE",
        help="add the draft-model columns: trioserve --draft-model SOURCE, and the peer with "
        "that model's directory",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        help="draft tokens per step, for both servers (trioserve --speculation-draft-tokens, "
        "all its modes; mlx_lm.server --num-draft-tokens); default: each one's own",
    )
    p.add_argument("--no-peer", action="store_true", help="skip mlx_lm.server")
    p.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS_NUM_THREADS for every server (default: none; trioserve then runs "
        "--blas-threads auto, mlx_lm.server OpenBLAS's default of every core)",
    )
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--server-arg", action="append", default=[], help="passed to trioserve")
    p.add_argument("--only", help="run the cases whose workload/streams/column contain this")
    return p.parse_args()


def make_servers(args: argparse.Namespace, model_dir: Path, logs: Path) -> dict[str, ServerProcess]:
    """The servers the columns need, by name, not started yet."""
    env, slots = blas_env(args), max(args.streams)
    ours, theirs = list(args.server_arg), []
    if args.draft_tokens:
        ours += ["--speculation-draft-tokens", str(args.draft_tokens)]
        theirs = ["--num-draft-tokens", str(args.draft_tokens)]
    if args.draft_model:
        ours += ["--draft-model", args.draft_model]
    servers = {"trioserve": trioserve_server(model_dir, logs, env, slots, extra=ours)}
    if not args.no_peer:
        servers["peer"] = peer_server(model_dir, logs, env, slots)
    if not args.no_peer and args.draft_model:
        from trioserve.models import resolve  # as trioserve resolves --draft-model

        draft_dir = resolve(args.draft_model).path
        extra = ["--draft-model", str(draft_dir), *theirs]
        servers["peer-draft"] = peer_server(
            model_dir, logs, env, slots, extra=extra, name="peer-draft"
        )
    return servers


def cases(
    args: argparse.Namespace, servers: dict[str, ServerProcess]
) -> list[tuple[str, int, str]]:
    """(workload, streams, column) in run order; a chat answer has no prediction."""
    columns = [c for c, s in SERVER_OF.items() if s in servers]
    if not args.draft_model:
        columns.remove("draft-model")
    out = []
    for streams in args.streams:
        out += [("edit", streams, c) for c in columns]
        out += [("chat", streams, c) for c in columns if c != "prediction"]
    if args.only:
        out = [c for c in out if args.only in "/".join(map(str, c))]
    return out


def bodies(workload: str, streams: int, column: str, max_tokens: int) -> list[dict[str, Any]]:
    nonce = uuid.uuid4().hex[:8]
    if workload == "edit":
        return [edit_body(max_tokens, column, f"{nonce}{i}") for i in range(streams)]
    return [chat_body(max_tokens, column, f"{nonce}{i}", i) for i in range(streams)]


def main() -> int:
    args = parse_args()
    model_dir = args.model or default_model_dir()
    print(machine_line())
    print(f"load average at start: {load_average()}")
    logs = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    servers = make_servers(args, model_dir, logs)
    todo = cases(args, servers)
    raw: dict[str, list[dict]] = {}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_healthy()
        check_blas(list(servers.values()))
        for column in dict.fromkeys(c for _, _, c in todo):  # warm-up: one short of each kind
            url = servers[SERVER_OF[column]].url
            warm = [edit_body(8, column, "warm"), chat_body(8, column, "warm", 0)]
            trio.run(run_streams, url, warm)
        for rep in range(args.repeat):
            for workload, streams, column in todo:
                server = servers[SERVER_OF[column]]
                ours = SERVER_OF[column] == "trioserve"
                before = draft_counts(server.url) if ours else None
                started = time.perf_counter()
                batch = bodies(workload, streams, column, args.max_tokens)
                results = trio.run(run_streams, server.url, batch)
                after = draft_counts(server.url) if ours else None
                fig = figures(results, before, after, column)
                fig["wall_s"] = time.perf_counter() - started
                key = f"{workload}/{streams}/{column}"
                raw.setdefault(key, []).append(fig)
                print(
                    f"[{rep + 1}/{args.repeat}] {key}: {fmt(fig['tok_s'], 1)} tok/s, ITL p50 "
                    f"{fmt(fig['itl_p50_ms'], 0)} / p95 {fmt(fig['itl_p95_ms'], 0)} ms, "
                    f"acceptance {fmt(fig['acceptance'])}",
                    flush=True,
                )
    except BaseException:
        for s in servers.values():
            print(f"--- {s.name} log (tail) ---\n{s.log_tail(15)}", file=sys.stderr)
        raise
    finally:
        for s in servers.values():
            s.stop(timeout_s=10)
    print()
    print(f"load average at end: {load_average()}")
    report(raw, [c for c in SERVER_OF if any(k.endswith("/" + c) for k in raw)])
    if "peer-draft" in servers:
        print(
            "peer draft-model: mlx_lm.server turns batching off with a draft model, so its "
            "concurrent streams are served one at a time."
        )
    print("acceptance: from trioserve's /metrics; mlx_lm.server reports none (—). Blank: not run.")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


def report(raw: dict[str, list[dict]], columns: list[str]) -> None:
    """One table: a row per workload, stream count and figure, a column per mode."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for key, figs in raw.items():
        workload, streams, column = key.split("/")
        med = {k: _median([f[k] for f in figs]) for k in figs[0]}
        off = _median([f["tok_s"] for f in raw.get(f"{workload}/{streams}/off", [])])
        speedup = med["tok_s"] / off if med["tok_s"] and off else None
        values = (med["tok_s"], speedup, med["itl_p50_ms"], med["itl_p95_ms"], med["acceptance"])
        for figure, value, digits in zip(FIGURES, values, (1, 2, 0, 0, 2), strict=True):
            cells.setdefault((workload, streams), {})[f"{column}/{figure}"] = fmt(value, digits)
    rows = [
        [workload, streams, figure, *(got.get(f"{c}/{figure}", "") for c in columns)]
        for (workload, streams), got in cells.items()
        for figure in FIGURES
    ]
    print_table(["workload", "streams", "figure", *columns], rows)


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


if __name__ == "__main__":
    sys.exit(main())
