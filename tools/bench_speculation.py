"""Speculative decoding over HTTP: a code-edit workload and plain chat, speculation off,
prompt lookup and Predicted Outputs (issue 18).

Why: drafting pays only where the answer repeats text the server can see (an edited file);
elsewhere it must not cost. This starts one trioserve (``--parallel 8``, speculation chosen
per request with the ``speculation`` field, so every mode runs on the same process), sends
streamed chat requests at temperature 0 and prints, per workload, mode and concurrency:
decode tok/s (aggregate after the first token), inter-token latency p50/p95 counted per
token (tokens that arrive in one read are 0 s apart), and the acceptance rate of drafts
(from ``/metrics``). Modes run interleaved, ``--repeat`` times, medians printed.

The edit workload asks for tests/fixtures/speculation/inventory.py back with a class
renamed, on /v1/completions with the chat template written out and the assistant's turn
opened with a code fence (an assistant prefill: asked in plain chat, this 135M model explains
the file instead of editing it); its prediction is that file with the rename done. The chat
workload is the story prompts of tools/bench_common.py on /v1/chat/completions.

Usage:
    .venv/bin/python tools/bench_speculation.py [--repeat 1] [--max-tokens 128] [--json OUT]
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
from bench_common import (
    ROOT,
    aggregate_decode_rate,
    default_model_dir,
    fmt,
    load_average,
    machine_line,
    percentile,
    print_table,
    story_messages,
)

from trioserve.testing import free_port, serve_argv, start_server

SOURCE = (ROOT / "tests" / "fixtures" / "speculation" / "inventory.py").read_text()
EDITED = SOURCE.replace("Inventory", "Stock")
MODES = ("off", "prompt-lookup", "prediction")


# SmolLM2's chat template, written out (its default system prompt included).
TEMPLATE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n```python\n"
)


def edit_body(max_tokens: int, mode: str, nonce: str) -> dict[str, Any]:
    ask = (
        f"[{nonce}] Rename the class `Inventory` to `Stock` in this file and return the whole file."
    )
    body: dict[str, Any] = {
        "prompt": TEMPLATE.format(user=f"{ask}\n\n```python\n{SOURCE}```"),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mode == "prediction":
        body["prediction"] = {"type": "content", "content": EDITED}
    else:
        body["speculation"] = mode
    return body


def chat_body(max_tokens: int, mode: str, nonce: str, index: int) -> dict[str, Any]:
    return {
        "messages": story_messages(index, nonce),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "speculation": mode,
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


def figures(results: list[StreamResult], before: dict, after: dict, mode: str) -> dict:
    traces = [r.trace for r in results]
    gaps = [g for t in traces for g in t.gaps()]
    method = "prediction" if mode == "prediction" else mode
    proposed = after.get(method, (0, 0))[0] - before.get(method, (0, 0))[0]
    accepted = after.get(method, (0, 0))[1] - before.get(method, (0, 0))[1]
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
    p.add_argument("--streams", type=int, default=8, help="the concurrent case (default 8)")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--server-arg", action="append", default=[], help="passed to the server")
    p.add_argument("--only", help="run the cases whose workload/streams/mode contain this")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    model_dir = args.model or default_model_dir()
    print(machine_line())
    print(f"load average at start: {load_average()}")
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    argv = serve_argv(
        port, "--model", str(model_dir), "--parallel", str(args.streams), *args.server_arg
    )
    server = start_server(argv, port, log_path=logs / "trioserve.log", cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    raw: dict[str, list[dict]] = {}
    try:
        # Warm-up: one short request of each kind.
        trio.run(run_streams, base, [edit_body(8, "off", "warm"), chat_body(8, "off", "w", 0)])
        cases = []
        for streams in (1, args.streams):
            cases += [("edit", streams, m) for m in MODES]
            cases += [("chat", streams, m) for m in ("off", "prompt-lookup")]
        if args.only:
            cases = [c for c in cases if args.only in "/".join(map(str, c))]
        for rep in range(args.repeat):
            for workload, streams, mode in cases:
                nonce = uuid.uuid4().hex[:8]
                if workload == "edit":
                    bodies = [
                        edit_body(args.max_tokens, mode, f"{nonce}{i}") for i in range(streams)
                    ]
                else:
                    bodies = [
                        chat_body(args.max_tokens, mode, f"{nonce}{i}", i) for i in range(streams)
                    ]
                before = draft_counts(base)
                started = time.perf_counter()
                results = trio.run(run_streams, base, bodies)
                after = draft_counts(base)
                fig = figures(results, before, after, mode)
                fig["wall_s"] = time.perf_counter() - started
                key = f"{workload}/{streams}/{mode}"
                raw.setdefault(key, []).append(fig)
                print(
                    f"[{rep + 1}/{args.repeat}] {key}: {fmt(fig['tok_s'], 1)} tok/s, ITL p50 "
                    f"{fmt(fig['itl_p50_ms'], 0)} / p95 {fmt(fig['itl_p95_ms'], 0)} ms, "
                    f"acceptance {fmt(fig['acceptance'])}",
                    flush=True,
                )
    finally:
        server.stop()
    rows = []
    off_rate = {}
    for key, figs in raw.items():
        workload, streams, mode = key.split("/")
        med = {k: _median([f[k] for f in figs]) for k in ("tok_s", "itl_p50_ms", "itl_p95_ms")}
        acc = _median([f["acceptance"] for f in figs])
        if mode == "off":
            off_rate[(workload, streams)] = med["tok_s"]
        base_rate = off_rate.get((workload, streams))
        speedup = med["tok_s"] / base_rate if med["tok_s"] and base_rate else None
        rows.append(
            [
                workload,
                str(streams),
                mode,
                fmt(med["tok_s"], 1),
                fmt(speedup),
                fmt(med["itl_p50_ms"], 0),
                fmt(med["itl_p95_ms"], 0),
                fmt(acc),
            ]
        )
    print()
    print(f"load average at end: {load_average()}")
    print_table(
        [
            "workload",
            "streams",
            "speculation",
            "tok/s",
            "x off",
            "ITL p50 ms",
            "ITL p95 ms",
            "acceptance",
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


if __name__ == "__main__":
    sys.exit(main())
