"""Tune prompt lookup offline: record greedy outputs once, replay them through the drafters.

Why: with temperature 0 whether a draft is accepted depends only on the output the model
gives anyway, so one recorded output per prompt answers "how many steps would these settings
take" for any setting, in milliseconds and without the noise of a timed run. This records
the edit and chat workloads of tools/bench_speculation.py on the real engine (one sequence at
a time, as the single-stream figures run), measures on the same machine what a plain step
and a speculative step of each width cost, and replays the outputs through trioserve's own
``SpecRow``/``LookupDrafter`` (the code the server runs) for a grid of settings.

The estimate is the sum of step costs: a step without a draft costs a pipelined plain step
(mlx-lm builds the next step's graph while this one computes); a step verifying ``k`` drafts
costs a synchronous step of width ``k + 1`` (it needs its tokens on the host before the
next step can start). It is a model (it leaves out batch numerics and the host work of each
step); use it to rank settings, then confirm the chosen one with bench_speculation.py.

Usage:
    .venv/bin/python tools/replay_speculation.py record OUT.json [--tokens 256] [--prompts 2]
    .venv/bin/python tools/replay_speculation.py replay OUT.json [--tokens 128 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from bench_common import default_model_dir, story_messages
from bench_speculation import EDITED, edit_prompt

from trioserve.engine.speculation import SpeculationConfig, accept_point_draft, make_spec_row

WIDTHS = (1, 2, 3, 5, 9, 17)


# -- record -------------------------------------------------------------------------------


async def _record_outputs(model_dir: Path, tokens: int, prompts: int) -> list[dict[str, Any]]:
    from trioserve.engine.events import TokenDelta
    from trioserve.engine.params import GenerationRequest
    from trioserve.engine.scheduler import Engine, EngineConfig
    from trioserve.models.chat_template import chat_prompt_tokens, completion_prompt_tokens
    from trioserve.models.loading import load_model

    engine = Engine(EngineConfig(load=lambda: load_model(model_dir), parallel=1))
    records = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        tok = engine.tokenizer
        cases = []
        for i in range(prompts):
            prompt = completion_prompt_tokens(tok, edit_prompt(f"r{i}"))  # as /v1/completions
            cases.append(("edit", prompt))
            cases.append(("chat", chat_prompt_tokens(tok, story_messages(i, f"r{i}"))))
        for workload, prompt in cases:
            request = GenerationRequest(
                prompt_tokens=tuple(prompt), max_tokens=tokens, request_id=workload
            )
            out = []
            with engine.admit(request) as handle:
                await handle.start()
                async for event in handle.events():
                    if isinstance(event, TokenDelta):
                        out.append(event.token)
            records.append({"workload": workload, "prompt": list(prompt), "out": out})
            print(f"recorded {workload}: {len(prompt)} prompt tokens, {len(out)} out", flush=True)
        prediction = tok.encode(EDITED, add_special_tokens=False)
        nursery.cancel_scope.cancel()
    for r in records:
        if r["workload"] == "edit":
            r["prediction"] = list(prediction)
    return records


def _measure_step_costs(model_dir: Path, context: int, reps: int = 15) -> dict[str, float]:
    """Median ms of one step on a ``context``-token cache (the model as the server runs it:
    trioserve's BLAS and CPU kernels): "plain" pipelined as mlx-lm decodes, and each width
    of ``WIDTHS`` evaluated at once, as a speculative step is."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from trioserve.engine.cpu_kernels import install_cpu_kernels
    from trioserve.models.loading import load_model

    model = load_model(model_dir)[0]
    install_cpu_kernels(model)
    cache = [BatchKVCache([0]) for _ in model.layers]
    prompt = mx.array([[(i * 7919) % 40000 + 100 for i in range(context)]])
    for start in range(0, context, 256):
        mx.eval(model(prompt[:, start : start + 256], cache=cache))
    costs = {}
    for width in WIDTHS:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            logits = model(mx.array([[5] * width]), cache=cache)
            mx.eval(mx.argmax(logits, axis=-1))
            times.append(time.perf_counter() - t0)
            for c in cache:
                c.trim(width)
        costs[str(width)] = 1000 * statistics.median(times)
        print(f"width {width:2d}: {costs[str(width)]:.0f} ms", flush=True)
    times = []
    token = mx.argmax(model(mx.array([[5]]), cache=cache)[:, -1], axis=-1)
    mx.async_eval(token)
    for _ in range(reps):
        t0 = time.perf_counter()
        following = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(following)
        token.tolist()
        token = following
        times.append(time.perf_counter() - t0)
    costs["plain"] = 1000 * statistics.median(times)
    print(f"plain, pipelined: {costs['plain']:.0f} ms", flush=True)
    return costs


def record(args: argparse.Namespace) -> int:
    model_dir = args.model or default_model_dir()
    records = trio.run(_record_outputs, model_dir, args.tokens, args.prompts)
    context = max(len(r["prompt"]) for r in records)
    costs = _measure_step_costs(model_dir, context)
    args.file.write_text(json.dumps({"step_ms": costs, "records": records}))
    print(f"wrote {args.file}")
    return 0


# -- replay -------------------------------------------------------------------------------


def _wide_ms(step_ms: dict[str, float], width: int) -> float:
    """A speculative step of ``width``, interpolated between the widths measured (and
    extrapolated past the widest)."""
    points = sorted((int(w), ms) for w, ms in step_ms.items() if w != "plain")
    for (w0, m0), (w1, m1) in itertools.pairwise(points):
        if width <= w1:
            return m0 + (m1 - m0) * (width - w0) / (w1 - w0)
    (w0, m0), (w1, m1) = points[-2:]
    return m1 + (m1 - m0) * (width - w1) / (w1 - w0)


def replay(
    record: dict[str, Any],
    config: SpeculationConfig,
    step_ms: dict[str, float],
    tokens: int,
    prediction: Sequence[int] | None = None,
) -> tuple[float, int]:
    """Estimated speedup over plain decoding and the steps taken, for one recorded output.

    Follows SpecGenerationBatch.next for a single sequence: after a plain step the pending
    token is not known yet; after a speculative step it is."""
    prompt, out = record["prompt"], record["out"][:tokens]
    req = SimpleNamespace(
        prompt_tokens=prompt, prediction_tokens=prediction, speculation="prompt-lookup"
    )
    row = make_spec_row(req, config, sampler=None, fault=None, has_processors=False)
    plain = step_ms["plain"]
    pos, known, spent, steps = 0, False, 0.0, 0
    while pos < len(out):
        steps += 1
        draft: list[int] = []
        if row.wants_draft():
            row.catch_up(prompt + out[:pos])
            room = len(out) - pos - 1  # one sequence: the whole step budget is its own
            draft = row.draft(min(config.step_budget - 1, room), out[pos] if known else None)
        if not draft:
            spent += plain
            pos, known = pos + 1, False
            continue
        accepted = accept_point_draft(out[pos + 1 :], draft)
        row.record(len(draft), accepted)
        spent += _wide_ms(step_ms, len(draft) + 1)
        pos, known = pos + 1 + accepted, True
    return len(out) * plain / spent, steps


def replay_grid(args: argparse.Namespace) -> int:
    data = json.loads(args.file.read_text())
    step_ms, records = data["step_ms"], data["records"]
    print("step ms (plain; speculative by width):", {w: round(ms) for w, ms in step_ms.items()})
    default = SpeculationConfig(mode="prompt-lookup")
    grid = itertools.product((1, 2, 3), (0.0, 0.2, 0.5, 1.0), (8, 32, 256), (10, 16))
    rows = []
    for ngram_min, min_yield, max_pause, num_draft in grid:
        config = replace(
            default,
            ngram_min=ngram_min,
            min_yield=min_yield,
            max_pause=max_pause,
            num_draft=num_draft,
            step_budget=max(default.step_budget, num_draft + 1),
        )
        figures: dict[str, list[float]] = {"edit": [], "prediction": [], "chat": []}
        for r in records:
            for n in args.tokens:
                figures[r["workload"]].append(replay(r, config, step_ms, n)[0])
                if r["workload"] == "edit":
                    figures["prediction"].append(replay(r, config, step_ms, n, r["prediction"])[0])
        settings = (ngram_min, min_yield, max_pause, num_draft)
        defaults = (default.ngram_min, default.min_yield, default.max_pause, default.num_draft)
        mark = "*" if settings == defaults else " "
        rows.append(
            (
                statistics.mean(figures["edit"]),
                statistics.mean(figures["prediction"]),
                statistics.mean(figures["chat"]),
                min(figures["chat"]),
                f"{mark} ngram_min {ngram_min} min_yield {min_yield} max_pause {max_pause:3d}"
                f" num_draft {num_draft}",
            )
        )
    rows.sort(key=lambda r: -(r[0] + r[2]))
    print("estimated speedup over plain decoding (mean over outputs; * = the defaults)")
    print(f"{'edit':>6} {'pred':>6} {'chat':>6} {'chat min':>8}  settings")
    for edit, pred, chat, chat_min, label in rows[: args.top]:
        print(f"{edit:6.2f} {pred:6.2f} {chat:6.2f} {chat_min:8.2f}  {label}")
    for edit, pred, chat, chat_min, label in rows:
        if label.startswith("*"):
            print(f"{edit:6.2f} {pred:6.2f} {chat:6.2f} {chat_min:8.2f}  {label}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record greedy outputs and step costs")
    rec.add_argument("file", type=Path)
    rec.add_argument("--model", type=Path, help="model dir (default: the embedded model)")
    rec.add_argument("--tokens", type=int, default=256, help="per output (default 256)")
    rec.add_argument("--prompts", type=int, default=2, help="per workload (default 2)")
    rep = sub.add_parser("replay", help="estimate a grid of settings from a recording")
    rep.add_argument("file", type=Path)
    rep.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    rep.add_argument("--top", type=int, default=15, help="rows printed (default 15)")
    args = p.parse_args()
    return record(args) if args.command == "record" else replay_grid(args)


if __name__ == "__main__":
    sys.exit(main())
