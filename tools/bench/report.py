"""The report: one row per figure, min and median per server, trioserve's ratio of medians to
each other server and the goal (issue 6), then the in-process limit."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench_common import fmt, machine_line, print_table, ratio, summarize

from trioserve.testing import ServerProcess

from .results import Results
from .servers import blas_env
from .workloads import CONCURRENCY


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    goal: str = ""


def figures(args: argparse.Namespace) -> list[Figure]:
    out = [Figure("ttft_short_s", "TTFT, short prompt", "s")]
    for t in args.ttft_lengths:
        out.append(Figure(f"ttft_{t}_s", f"TTFT, ~{t}-token prompt", "s", "<= 1"))
    out.append(Figure("decode_tps_1", "decode tok/s, 1 stream", "tok/s"))
    for n in CONCURRENCY:
        out.append(
            Figure(
                f"agg_greedy_tps_{n}",
                f"aggregate tok/s, {n} stream{'s' if n > 1 else ''}",
                "tok/s",
                ">= 1.1" if n == 8 else "",
            )
        )
    temp = args.seed_temperature
    for n in CONCURRENCY:
        out.append(
            Figure(
                f"agg_seeded_tps_{n}",
                f"aggregate tok/s, {n} seeded (T={temp:g})",
                "tok/s",
                ">= 4" if n == 8 else "",
            )
        )
    out += [
        Figure("itl_p50_ms", "inter-token latency p50, 8 streams", "ms"),
        Figure("itl_p95_ms", "inter-token latency p95, 8 streams", "ms", "<= 0.9"),
        Figure(
            "interference_gap_s",
            f"longest gap of {args.interference_streams} streams, long prompt arrives",
            "s",
        ),
        Figure(
            "hangup_prefill_cpu_s", "CPU-s in 5 s after hang-up mid-prefill", "CPU-s", "abs <= 0.3"
        ),
        Figure("hangup_prefill_next_ttft_s", "  then TTFT of the next request", "s", "abs <= 1"),
        Figure("hangup_decode_cpu_s", "CPU-s in 5 s after hang-up mid-decode", "CPU-s"),
        Figure("hangup_decode_next_ttft_s", "  then TTFT of the next request", "s"),
        Figure("idle_cpu_s", "idle CPU-s in 5 s", "CPU-s"),
        Figure("idle_rss_mib_start", "idle RSS after warm-up", "MiB"),
        Figure("idle_rss_mib_end", "idle RSS at the end", "MiB"),
    ]
    return out


def median_prompt(results: Results, server_name: str, key: str) -> int | None:
    sizes = results.prompt_sizes[server_name].get(key, [])
    return sorted(sizes)[len(sizes) // 2] if sizes else None


def _label(results: Results, fig: Figure) -> str:
    """Figures on a prompt say its measured size (from the servers' usage)."""
    sizes = [n for per in results.prompt_sizes.values() for n in per.get(fig.key, [])]
    if not sizes:
        return fig.label
    size = sorted(sizes)[len(sizes) // 2]
    if fig.key.startswith("ttft_"):
        return f"TTFT, {size}-token prompt"
    if fig.key == "interference_gap_s":
        return f"{fig.label} ({size} tokens)"
    return fig.label


def summary(results: Results, args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    return {
        name: {f.key: summarize(per.get(f.key, [])) for f in figures(args)}
        for name, per in results.values.items()
    }


def print_report(
    results: Results,
    servers: list[ServerProcess],
    args: argparse.Namespace,
    limits: dict | None,
) -> None:
    table = summary(results, args)
    names = [s.name for s in servers]
    print(f"\nbench_server: {machine_line()}")
    print(
        f"model {args.model_dir}, float32; max_tokens {args.max_tokens}, temperature 0 "
        f"(seeded rows: T={args.seed_temperature:g}, a distinct seed per request); "
        f"{args.repeat} repeat(s), interleaved"
    )
    threads = blas_env(args).get("OPENBLAS_NUM_THREADS", "OpenBLAS's default")
    print(f"OPENBLAS_NUM_THREADS for both servers and the in-process limit: {threads}")
    for s in servers:
        print(f"  {s.name}: {' '.join(Path(a).name if a.startswith('/') else a for a in s.argv)}")
    headers = ["figure", "unit"]
    for n in names:
        headers += [f"{n} min", f"{n} med"]
    # Ratios of trioserve's median to each other server's that ran.
    others = [(n, "t/p" if n == "peer" else "t/llama") for n in names if n != "trioserve"]
    if "trioserve" not in names:
        others = []
    headers += [f"ratio {label}" for _, label in others] + ["goal"]
    rows = []
    for f in figures(args):
        cells = [_label(results, f), f.unit]
        for n in names:
            s = table[n][f.key]
            digits = 0 if f.unit == "MiB" else 1 if f.unit in ("ms", "tok/s") else 2
            cells += [fmt(s["min"], digits), fmt(s["median"], digits)]
        for other, _ in others:
            cells.append(
                fmt(ratio(table["trioserve"][f.key]["median"], table[other][f.key]["median"]))
            )
        cells.append(f.goal)
        rows.append(cells)
    print_table(headers, rows)
    print(
        "ratio t/p = trioserve median / peer median, t/llama = trioserve / llama-server."
        " Goals (issue 6): t/p unless 'abs'."
    )
    if "llama-server" in names:
        print(
            "llama-server serves the GGUF file as it is (its quantization, ggml's kernels);"
            " trioserve and the peer run its float32 conversion."
        )
    if limits:
        _print_limits(table, names, limits)


def _print_limits(table: dict[str, dict[str, dict]], names: list[str], limits: dict) -> None:
    sg, bg = (
        summarize(limits["stream_generate_tps"]),
        summarize(limits["batch_generator_8_tps"]),
    )
    print("\nin-process limit, no HTTP (raw mlx-lm, same weights and prefill step):")
    lim_rows = [
        ["mlx-lm stream_generate decode tok/s", fmt(sg["min"], 1), fmt(sg["median"], 1)],
        ["mlx-lm BatchGenerator, 8 prompts, tok/s", fmt(bg["min"], 1), fmt(bg["median"], 1)],
    ]
    print_table(["figure", "min", "median"], lim_rows)
    if "trioserve" in names:
        one = table["trioserve"]["decode_tps_1"]["median"]
        eight = table["trioserve"]["agg_greedy_tps_8"]["median"]
        print(
            f"trioserve / limit: 1 stream {fmt(ratio(one, sg['median']))} (goal >= 0.95), "
            f"8 streams {fmt(ratio(eight, bg['median']))} (goal >= 0.95)"
        )
