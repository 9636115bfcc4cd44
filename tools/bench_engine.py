"""Benchmark the engine without HTTP, beside the raw mlx-lm calls it wraps (issue 2 §6).

Why: the engine adds a thread hop, a command queue, per-token events and detokenization
around mlx-lm's `BatchGenerator`. This measures what that costs, in the same process and
on the same weights: mlx-lm `stream_generate` against the engine's single stream, the
engine's aggregate at 1, 4 and 8 sequences against raw `BatchGenerator` at 8, and float32
GEMM with MLX's reference BLAS against OpenBLAS (through tools/bench_blas.py).

Decode rates leave prefill out: they count tokens after the first and time them from the
first token's arrival. Runs are interleaved across repeats, and each figure shows the median
and the min of ``--repeat`` runs. A benchmark, not a test: on a busy machine the absolute
figures move a lot, the ratios less.

Usage:
    .venv/bin/python tools/bench_engine.py [--max-tokens 128] [--repeat 3] [--json OUT]
    .venv/bin/python tools/bench_engine.py --limits-only --json OUT   # used by bench_server
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from bench_common import (
    TokenTrace,
    aggregate_decode_rate,
    chat_tokens,
    default_model_dir,
    fmt,
    machine_line,
    print_table,
    ratio,
    story_messages,
    summarize,
)

import trioserve  # noqa: F401  (preloads OpenBLAS; mlx is imported lazily, after it)

CONCURRENCY = (1, 4, 8)


# -- raw mlx-lm -------------------------------------------------------------------------


def raw_stream_generate(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> dict:
    """One mlx-lm `stream_generate` run: decode tok/s from the first token on."""
    from mlx_lm import stream_generate

    trace = TokenTrace(sent_at=time.perf_counter())
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        trace.token_times.append(time.perf_counter())
    return {"decode_tps": trace.decode_rate(), "ttft_s": trace.ttft, "tokens": trace.count}


def raw_batch_generator(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int, prefill_step: int
) -> dict:
    """mlx-lm `BatchGenerator` with every prompt inserted at once: aggregate decode tok/s."""
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=n,
        prefill_batch_size=n,
        prefill_step_size=prefill_step,
    )
    try:
        sent = time.perf_counter()
        uids = gen.insert(prompts, max_tokens=[max_tokens] * n)
        traces = {uid: TokenTrace(sent_at=sent) for uid in uids}
        pending = set(uids)
        while pending:
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                traces[r.uid].token_times.append(now)
                if r.finish_reason is not None:
                    pending.discard(r.uid)
    finally:
        gen.close()
    return {
        "aggregate_tps": aggregate_decode_rate(list(traces.values())),
        "tokens": [t.count for t in traces.values()],
    }


# -- the engine -------------------------------------------------------------------------


async def engine_run(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict:
    """``len(prompts)`` concurrent requests through the engine; times taken on the Trio side."""
    from trioserve.engine.events import Failed, TokenDelta
    from trioserve.engine.params import GenerationRequest, SamplingParams

    traces = [TokenTrace(sent_at=0.0) for _ in prompts]
    errors: list[str] = []

    async def one(i: int) -> None:
        request = GenerationRequest(
            prompt_tokens=tuple(prompts[i]),
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=0.0),
            request_id=f"bench-{i}",
        )
        traces[i].sent_at = time.perf_counter()
        with engine.admit(request) as handle:
            await handle.start()
            async for event in handle.events():
                if isinstance(event, TokenDelta):
                    traces[i].token_times.append(time.perf_counter())
                elif isinstance(event, Failed):
                    errors.append(event.message)

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    if errors:
        raise RuntimeError(f"engine run failed: {errors[0]}")
    result: dict[str, Any] = {
        "aggregate_tps": aggregate_decode_rate(traces),
        "tokens": [t.count for t in traces],
    }
    if len(traces) == 1:
        result["decode_tps"] = traces[0].decode_rate()
        result["ttft_s"] = traces[0].ttft
    return result


# -- driver -----------------------------------------------------------------------------


def _prompts(tokenizer: Any, n: int, rep: int) -> list[list[int]]:
    return [chat_tokens(tokenizer, story_messages(i, f"{rep}-{i}")) for i in range(n)]


async def _measure(args: argparse.Namespace, model_dir: Path) -> dict[str, list[dict]]:
    import mlx_lm

    from trioserve.engine.scheduler import Engine, EngineConfig
    from trioserve.models.loading import load_model

    runs: dict[str, list[dict]] = {"stream_generate": [], "batch_generator_8": []}
    model, tokenizer = mlx_lm.load(str(model_dir))
    raw_stream_generate(model, tokenizer, _prompts(tokenizer, 1, -1)[0], 4)  # warm-up

    async with trio.open_nursery() as nursery:
        engine = None
        if not args.limits_only:
            engine = Engine(
                EngineConfig(
                    load=lambda: load_model(model_dir),
                    parallel=max(CONCURRENCY),
                    prefill_step_size=args.prefill_step_size,
                )
            )
            await nursery.start(engine.run)
        for rep in range(args.repeat):
            prompts = _prompts(tokenizer, max(CONCURRENCY), rep)
            steps = _steps(args, model, tokenizer, engine, prompts)
            if rep % 2:  # interleave: alternate the order between repeats
                steps.reverse()
            for name, step in steps:
                result = await step()
                runs.setdefault(name, []).append(result)
                print(f"  rep {rep + 1} {name}: {_brief(result)}", file=sys.stderr)
        nursery.cancel_scope.cancel()
    return runs


def _steps(
    args: argparse.Namespace, model: Any, tokenizer: Any, engine: Any, prompts: list[list[int]]
) -> list[tuple[str, Callable[[], Awaitable[dict]]]]:
    """One repeat's runs. The raw mlx-lm ones block the Trio thread: the engine idles then."""

    async def single() -> dict:
        return raw_stream_generate(model, tokenizer, prompts[0], args.max_tokens)

    async def batch() -> dict:
        return raw_batch_generator(
            model, tokenizer, prompts[:8], args.max_tokens, args.prefill_step_size
        )

    steps: list[tuple[str, Callable[[], Awaitable[dict]]]] = [
        ("stream_generate", single),
        ("batch_generator_8", batch),
    ]
    if engine is not None:
        for c in CONCURRENCY:
            steps.append((f"engine_{c}", partial(engine_run, engine, prompts[:c], args.max_tokens)))
    return steps


def _brief(result: dict) -> str:
    key = "decode_tps" if "decode_tps" in result else "aggregate_tps"
    return f"{fmt(result[key], 1)} tok/s, tokens {result['tokens']}"


def _gemm() -> list[dict] | None:
    """GEMM GFLOP/s per shape: the reference BLAS (preload off) and MLX's default (OpenBLAS)."""
    import bench_blas  # tools/bench_blas.py: runs each variant in its own subprocess

    ref = bench_blas._run_mlx(no_preload=True)
    fast = bench_blas._run_mlx(no_preload=False)
    return [
        {
            "shape": f"{m}x{k}@{k}x{n}",
            "reference_gflops": r,
            "openblas_gflops": f,
            "reference_library": ref["library"],
            "openblas_library": fast["library"],
        }
        for (m, k, n), r, f in zip(bench_blas.SHAPES, ref["gflops"], fast["gflops"], strict=True)
    ]


def _cell(runs: list[dict], key: str) -> tuple[str, float | None]:
    s = summarize([r.get(key) for r in runs])
    return f"{fmt(s['median'], 1)} ({fmt(s['min'], 1)})", s["median"]


def print_report(runs: dict[str, list[dict]], gemm: list[dict] | None, args: argparse.Namespace):
    print(f"\nbench_engine: {machine_line()}")
    print(
        f"max_tokens {args.max_tokens}, {args.repeat} repeat(s), prefill step "
        f"{args.prefill_step_size}; tok/s are decode only, median (min); ratio of medians"
    )
    rows = []
    raw_cell, raw = _cell(runs["stream_generate"], "decode_tps")
    bg_cell, bg = _cell(runs["batch_generator_8"], "aggregate_tps")
    if "engine_1" in runs:
        one_cell, one = _cell(runs["engine_1"], "decode_tps")
        rows.append(
            [
                "decode tok/s, 1 stream",
                "stream_generate",
                raw_cell,
                one_cell,
                fmt(ratio(one, raw)),
                ">= 0.95",
            ]
        )
        for c in CONCURRENCY:
            cell, value = _cell(runs[f"engine_{c}"], "aggregate_tps")
            goal = ">= 4" if c == 8 else ""
            rows.append(
                [
                    f"aggregate tok/s, {c} stream{'s' if c > 1 else ''}",
                    "engine, 1 stream",
                    one_cell,
                    cell,
                    fmt(ratio(value, one)),
                    goal,
                ]
            )
        cell8, eight = _cell(runs["engine_8"], "aggregate_tps")
        rows.append(
            [
                "aggregate tok/s, 8 streams",
                "BatchGenerator, 8",
                bg_cell,
                cell8,
                fmt(ratio(eight, bg)),
                ">= 0.95",
            ]
        )
    else:
        rows.append(["decode tok/s, 1 stream", "stream_generate", raw_cell, "—", "—", ""])
        rows.append(["aggregate tok/s, 8 streams", "BatchGenerator, 8", bg_cell, "—", "—", ""])
    for g in gemm or []:
        rows.append(
            [
                f"GEMM GFLOP/s {g['shape']}",
                "reference BLAS",
                fmt(g["reference_gflops"], 1),
                fmt(g["openblas_gflops"], 1),
                fmt(ratio(g["openblas_gflops"], g["reference_gflops"]), 1),
                "",
            ]
        )
    print_table(["figure", "baseline", "baseline", "trioserve", "ratio", "goal"], rows)
    if gemm:
        print(f"(GEMM: trioserve column = MLX with {Path(gemm[0]['openblas_library']).name})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--model", type=Path, help="mlx-lm model dir (default: embedded)")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM rows")
    parser.add_argument(
        "--limits-only",
        action="store_true",
        help="only raw mlx-lm (stream_generate, BatchGenerator at 8), no engine, no GEMM",
    )
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    gemm = None if (args.no_gemm or args.limits_only) else _gemm()
    runs = trio.run(_measure, args, model_dir)
    print_report(runs, gemm, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_line(),
                    "model": str(model_dir),
                    "max_tokens": args.max_tokens,
                    "repeat": args.repeat,
                    "prefill_step_size": args.prefill_step_size,
                    "runs": runs,
                    "gemm": gemm,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
