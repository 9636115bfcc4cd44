"""What constrained decoding costs: decode tokens/s with and without a grammar.

Runs the real engine in-process on the embedded model (or ``--model DIR``). Each round runs
the same streams once unconstrained and once under a JSON-schema grammar, interleaved so a
noisy machine hurts both alike, and the medians are printed. Decode speed is measured from
each stream's first token to its last, so prefill is left out.

    .venv/bin/python tools/bench_constrained.py --streams 1 4 --rounds 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import trio

from trioserve.engine.constraints import (
    Constraint,
    GrammarProcessor,
    check_constraint,
    json_schema_constraint,
)
from trioserve.engine.events import Finished, TokenDelta
from trioserve.engine.params import GenerationRequest, SamplingParams
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.models import resolve
from trioserve.models.chat_template import chat_prompt_tokens
from trioserve.models.loading import load_model

# Long enough that neither run stops early: up to 12 strings of up to 40 characters.
SCHEMA = {
    "type": "object",
    "properties": {
        "cities": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 12,
            "maxItems": 12,
        }
    },
    "required": ["cities"],
    "additionalProperties": False,
}
PROMPT = "List twelve cities of Europe with a short description of each, as JSON."


async def one_stream(engine: Engine, request: GenerationRequest) -> tuple[int, float]:
    """(decoded tokens after the first, seconds from first to last token)."""
    first = last = None
    count = 0
    with engine.admit(request) as handle:
        await handle.start()
        async for event in handle.events():
            if isinstance(event, TokenDelta):
                last = time.perf_counter()
                first = first or last
                count += 1
            elif isinstance(event, Finished):
                break
    return max(count - 1, 0), (last - first) if first and last else 0.0


async def run_batch(engine: Engine, requests: list[GenerationRequest]) -> float:
    """Aggregate decode tokens/s of streams that run together."""
    results: list[tuple[int, float]] = []

    async def go(req: GenerationRequest) -> None:
        results.append(await one_stream(engine, req))

    async with trio.open_nursery() as nursery:
        for req in requests:
            nursery.start_soon(go, req)
    tokens = sum(n for n, _ in results)
    span = max(s for _, s in results)
    return tokens / span if span else 0.0


def mask_cost_ms(engine: Engine, constraint: Constraint, calls: int = 200) -> float:
    """Mean time of one processor call (feed a token, compute and apply the mask)."""
    import mlx.core as mx

    tokenizer = engine.tokenizer
    text = '{"cities": [' + ", ".join(f'"City number {i}"' for i in range(12)) + "]}"
    ids = tokenizer.encode(text, add_special_tokens=False)[:calls]
    processor = GrammarProcessor(constraint, tokenizer)
    logits = mx.zeros((1, 49152))
    context = [1, 2, 3]
    mx.eval(processor(mx.array(context), logits))
    started = time.perf_counter()
    for tok in ids:
        context.append(tok)
        mx.eval(processor(mx.array(context), logits))
    return 1000 * (time.perf_counter() - started) / len(ids)


async def main(args: argparse.Namespace) -> None:
    model_dir = Path(args.model) if args.model else resolve(None).path
    engine = Engine(EngineConfig(load=lambda: load_model(model_dir), parallel=max(args.streams)))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        tokens = chat_prompt_tokens(engine.tokenizer, [{"role": "user", "content": PROMPT}])
        constraint = json_schema_constraint(SCHEMA)
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(check_constraint, constraint, engine.tokenizer)
        print(
            f"grammar check (builds llguidance's tokenizer once): {time.perf_counter() - t0:.2f} s"
        )

        def request(constrained: bool, i: int) -> GenerationRequest:
            return GenerationRequest(
                prompt_tokens=tuple(tokens),
                max_tokens=args.max_tokens,
                sampling=SamplingParams(temperature=0.8, seed=i),
                constraint=constraint if constrained else None,
            )

        print(f"mask cost per token, measured alone: {mask_cost_ms(engine, constraint):.3f} ms")
        print(f"{'streams':>7} {'plain tok/s':>12} {'constrained tok/s':>18} {'cost':>7}")
        for n in args.streams:
            plain, constrained = [], []
            for r in range(args.rounds):
                plain.append(await run_batch(engine, [request(False, r * n + i) for i in range(n)]))
                constrained.append(
                    await run_batch(engine, [request(True, r * n + i) for i in range(n)])
                )
            p, c = statistics.median(plain), statistics.median(constrained)
            print(f"{n:>7} {p:>12.1f} {c:>18.1f} {100 * (p - c) / p:>6.1f}%")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an mlx-lm directory (default: embedded)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    trio.run(main, parser.parse_args())
