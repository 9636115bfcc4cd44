"""BLAS threads by contention: the engine with 1, 2 and ``auto`` OpenBLAS threads, on a quiet
machine and beside a busy process (issue 18 §2).

Why: two threads are faster while a core is free and up to twice as slow next to anything
busy (README, Performance); ``--blas-threads auto`` (trioserve/engine/blas_threads.py) is
meant to get the first without the second. This runs the real engine in-process, one engine
per setting (each loads the model), and times, per setting, with and without a neighbour
(a subprocess spinning on one core): the first token of a long prompt (prefill tok/s), one
stream's decode and eight streams' aggregate decode, greedy. Settings are interleaved across
repeats; each cell is the median (min) of ``--repeat`` runs. For ``auto`` it also prints the
thread count it ended each run at and how often it changed.

A benchmark, not a test: on a VM the absolute figures move a lot; compare within one run.

Usage:
    .venv/bin/python tools/bench_blas_threads.py [--repeat 2] [--max-tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import trio
from bench_common import (
    chat_token_counter,
    chat_tokens,
    default_model_dir,
    fmt,
    long_messages,
    machine_line,
    print_table,
    story_messages,
    summarize,
)
from bench_engine import engine_run

import trioserve  # noqa: F401  (preloads OpenBLAS; mlx is imported lazily, after it)

SETTINGS = ("1", "2", "auto")
NEIGHBOURS = ("quiet", "busy")
WORKLOADS = ("prefill", "decode_1", "decode_8")


class Neighbour:
    """A process that keeps one core busy (pure Python spinning) while the block runs."""

    def __enter__(self) -> Neighbour:
        self._proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it be seen: auto samples every 0.5 s
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()


async def _one_setting(
    setting: str, model_dir: Path, jobs: list[tuple[str, list[list[int]]]], args: argparse.Namespace
) -> dict[tuple[str, str], dict]:
    from trioserve.engine.scheduler import Engine, EngineConfig
    from trioserve.models.loading import load_model

    results: dict[tuple[str, str], dict] = {}
    async with trio.open_nursery() as nursery:
        engine = Engine(
            EngineConfig(
                load=lambda: load_model(model_dir),
                parallel=8,
                prefill_step_size=args.prefill_step_size,
                blas_threads=setting,
            )
        )
        await nursery.start(engine.run)
        for neighbour in NEIGHBOURS:
            context = Neighbour() if neighbour == "busy" else contextlib.nullcontext()
            with context:
                for workload, prompts in jobs:
                    # auto's next sample spans this pause: it sees the neighbour, or none.
                    await trio.sleep(0.6 if setting == "auto" else 0)
                    max_tokens = 1 if workload == "prefill" else args.max_tokens
                    started = time.perf_counter()
                    result = await engine_run(engine, prompts, max_tokens)
                    result["wall_s"] = time.perf_counter() - started
                    worker = engine.stats().worker
                    result["threads_at_end"] = worker.blas_threads
                    result["changes"] = worker.blas_thread_changes
                    results[(neighbour, workload)] = result
                    print(
                        f"  {setting:>4} {neighbour:5} {workload}: {_brief(result)}",
                        file=sys.stderr,
                    )
        nursery.cancel_scope.cancel()
    return results


def _brief(result: dict) -> str:
    figure = _figure(result)
    extra = f", threads {result['threads_at_end']}" if "threads_at_end" in result else ""
    return f"{fmt(figure, 1)}{extra}"


def _figure(result: dict) -> float | None:
    if "prefill_tps" in result:
        return result["prefill_tps"]
    if len(result["tokens"]) == 1 and result["tokens"][0] == 1:
        return None
    return result.get("decode_tps") or result.get("aggregate_tps")


async def _measure(args: argparse.Namespace, model_dir: Path) -> dict:
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(model_dir))
    count = chat_token_counter(tokenizer)
    runs: dict[str, dict[str, list]] = {}
    for rep in range(args.repeat):
        order = list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))
        for setting in order:
            long, n_long = long_messages(count, args.prompt_tokens, nonce=f"{setting}-{rep}")
            stories = [
                chat_tokens(tokenizer, story_messages(i, f"{setting}{rep}-{i}")) for i in range(8)
            ]
            jobs = [
                ("prefill", [chat_tokens(tokenizer, long)]),
                ("decode_1", stories[:1]),
                ("decode_8", stories),
            ]
            results = await _one_setting(setting, model_dir, jobs, args)
            for (neighbour, workload), result in results.items():
                if workload == "prefill":
                    result["prefill_tps"] = n_long / result["ttft_s"]
                runs.setdefault(setting, {}).setdefault(f"{neighbour}/{workload}", []).append(
                    result
                )
    return runs


def print_report(runs: dict, args: argparse.Namespace) -> None:
    print(f"\nbench_blas_threads: {machine_line()}")
    print(
        f"engine in-process, {args.repeat} repeat(s); prefill: a {args.prompt_tokens}-token prompt "
        f"(prompt tok/s to the first token); decode: {args.max_tokens} greedy tokens, tok/s from "
        "the first token; busy: a process spinning on one core beside; median (min)"
    )
    headers = ["workload"] + [f"{s} thread(s), {n}" for n in NEIGHBOURS for s in SETTINGS]
    rows = []
    for workload in WORKLOADS:
        row = [workload.replace("_", ", ") + (" stream(s)" if "decode" in workload else "")]
        for neighbour in NEIGHBOURS:
            for setting in SETTINGS:
                cell = runs.get(setting, {}).get(f"{neighbour}/{workload}", [])
                s = summarize([_figure(r) for r in cell])
                threads = sorted({r["threads_at_end"] for r in cell if "threads_at_end" in r})
                note = f" [{'/'.join(map(str, threads))}]" if setting == "auto" and threads else ""
                row.append(f"{fmt(s['median'], 1)} ({fmt(s['min'], 1)}){note}")
        rows.append(row)
    print_table(headers, rows)
    print("[n]: the thread count auto had chosen when the run ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--prefill-step-size", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    runs = trio.run(_measure, args, model_dir)
    print_report(runs, args)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
