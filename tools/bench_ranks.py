"""One rank against three on loopback (mlx.distributed, ring backend), same requests.

What it shows: tok/s and inter-token latency (one stream, two at once) for a plain
`trioserve serve` and for `mlx.launch --backend ring -n 3` of the same, and where a step
of three ranks goes: each layer all-sums twice (60 collectives a step for SmolLM2-135M's 30
layers) plus rank 0's round, timed alone under the same launcher.

    .venv/bin/python tools/bench_ranks.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from bench.client import StreamResult, chat_body, stream_chat
from bench_common import (
    aggregate_decode_rate,
    fmt,
    load_average,
    machine_line,
    percentile,
    print_table,
    story_messages,
)

from trioserve.testing import free_port, serve_argv, start_server
from trioserve.testing.ranks import RANKS, RankGroup, free_ring_ports, launcher_argv

HIDDEN = 576  # SmolLM2-135M's hidden size: what every layer's two all-sums carry per row
COLLECTIVES_PER_STEP = 60  # 30 layers x (attention output + MLP output)

# Run under mlx.launch: the latency of one all_sum of a decode step's
# activations (rows x HIDDEN float32) and of rank 0's round header (3 int32).
_COLLECTIVE_PROBE = """
import json, statistics, time, mlx.core as mx
group = mx.distributed.init(strict=True)
out = {}
for name, shape, dtype in (("header", (3,), mx.int32), ("rows1", (1, 1, HIDDEN), mx.float32),
                           ("rows2", (2, 1, HIDDEN), mx.float32)):
    x = mx.ones(shape, dtype=dtype)
    mx.eval(mx.distributed.all_sum(x))
    times = []
    for _ in range(200):
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x))
        times.append(time.perf_counter() - t)
    out[name] = statistics.median(times) * 1e3
if group.rank() == 0:
    print("PROBE " + json.dumps(out), flush=True)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (32)")
    p.add_argument("--runs", type=int, default=3, help="single-stream runs per server (3)")
    return p.parse_args()


async def measure(v1_base: str, max_tokens: int, runs: int) -> dict[str, float | None]:
    """Single-stream runs, then two streams at once: decode rates and gaps."""
    async with httpx.AsyncClient(timeout=600) as client:
        warm = StreamResult()
        await stream_chat(client, v1_base, chat_body(story_messages(0, "w"), 4), warm, limit_s=600)
        singles = []
        for i in range(runs):
            result = StreamResult()
            body = chat_body(story_messages(i, f"s{i}"), max_tokens)
            await stream_chat(client, v1_base, body, result, limit_s=600)
            if result.error:
                raise RuntimeError(result.error)
            singles.append(result)
        pair = [StreamResult(), StreamResult()]
        async with trio.open_nursery() as nursery:
            for i, result in enumerate(pair):
                body = chat_body(story_messages(i + 5, f"p{i}"), max_tokens)
                nursery.start_soon(
                    lambda b=body, r=result: stream_chat(client, v1_base, b, r, limit_s=600)
                )
    gaps = [g for r in singles for g in r.trace.gaps()]
    return {
        "single": statistics.median(r.trace.decode_rate() or 0 for r in singles),
        "p50": percentile(gaps, 50),
        "p95": percentile(gaps, 95),
        "pair": aggregate_decode_rate([r.trace for r in pair]),
        "ttft": statistics.median(r.trace.ttft or 0 for r in singles),
    }


def probe_collectives() -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(f"HIDDEN = {HIDDEN}\n" + _COLLECTIVE_PROBE)
    argv = [*launcher_argv(free_ring_ports()), f.name]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.PIPE)
    import json

    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise RuntimeError(f"the collective probe printed nothing:\n{out.stderr[-2000:]}")


def main() -> int:
    args = parse_args()
    print(machine_line())
    print(f"load average at start: {load_average()}")
    logs = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    serve = ("--parallel", "2")
    port = free_port()
    one = start_server(serve_argv(port, *serve), port, log_path=logs / "one.log")
    try:
        single = trio.run(measure, one.url, args.max_tokens, args.runs)
    finally:
        one.stop()
    group = RankGroup(logs, *serve)
    started = time.monotonic()
    group.start()
    startup = time.monotonic() - started
    try:
        three = trio.run(measure, group.server.url, args.max_tokens, args.runs)
    finally:
        group.stop()
    probe = probe_collectives()

    print(f"\n{args.max_tokens} greedy tokens a request; {RANKS} ranks started in {startup:.0f} s")
    rows = []
    for label, key, digits in (
        ("single stream, tok/s", "single", 1),
        ("two streams, aggregate tok/s", "pair", 1),
        ("inter-token p50, ms", "p50", 0),
        ("inter-token p95, ms", "p95", 0),
        ("time to first token, s", "ttft", 2),
    ):
        scale = 1000 if key in ("p50", "p95") else 1
        a, b = single[key], three[key]
        rows.append(
            [label, fmt(a * scale if a else None, digits), fmt(b * scale if b else None, digits)]
        )
    print_table(["", "1 rank", f"{RANKS} ranks"], rows)

    step_one, step_three = (single["p50"] or 0) * 1e3, (three["p50"] or 0) * 1e3
    collectives = COLLECTIVES_PER_STEP * probe["rows1"] + probe["header"]
    print(f"\nwhere a step of {RANKS} ranks goes (one stream, medians):")
    print_table(
        ["part", "ms"],
        [
            ["whole step (inter-token p50)", fmt(step_three, 1)],
            ["a step of 1 rank, for comparison", fmt(step_one, 1)],
            ["one all-sum of 1x576 float32 (a layer's output)", fmt(probe["rows1"], 2)],
            ["  the same at two rows", fmt(probe["rows2"], 2)],
            ["rank 0's round (3 int32)", fmt(probe["header"], 2)],
            [f"{COLLECTIVES_PER_STEP} all-sums and a round, as timed alone", fmt(collectives, 1)],
        ],
    )
    share = collectives / step_three if step_three else None
    print(
        "the all-sums were timed in a separate launch: "
        + (
            f"they come to {share:.0%} of a step"
            if share is not None and share <= 1
            else "more than a whole step (other load changed in between: not additive)"
        )
    )
    print(f"load average at end: {load_average()}; logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
