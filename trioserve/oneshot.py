"""``trioserve generate``: one prompt through the real engine, streamed to stdout.

It runs the same engine the server runs (one MLX thread, continuous batching), so it doubles
as the quickest check that a machine is set up right.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

from trioserve.engine.events import Failed, Finished, TokenDelta
from trioserve.engine.params import GenerationRequest, SamplingParams
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.models.chat_template import chat_prompt_tokens
from trioserve.models.loading import load_model


async def generate(
    model_dir: Path, prompt: str, *, max_tokens: int, temperature: float, seed: int | None
) -> int:
    """Stream one chat answer to stdout; return the process exit code."""
    engine = Engine(EngineConfig(load=lambda: load_model(model_dir), parallel=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        tokens = chat_prompt_tokens(engine.tokenizer, [{"role": "user", "content": prompt}])
        request = GenerationRequest(
            prompt_tokens=tuple(tokens),
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature, seed=seed),
            request_id="cli",
        )
        started = time.perf_counter()
        first_token_at = None
        code = 0
        with engine.admit(request) as handle:
            await handle.start()
            async for event in handle.events():
                if isinstance(event, TokenDelta):
                    first_token_at = first_token_at or time.perf_counter()
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Finished):
                    sys.stdout.write("\n")
                    decode_s = time.perf_counter() - (first_token_at or started)
                    rate = event.usage.completion_tokens / decode_s if decode_s > 0 else 0.0
                    print(
                        f"[{event.usage.prompt_tokens} prompt tokens, "
                        f"{event.usage.completion_tokens} generated, finish: {event.reason}, "
                        f"first token {(first_token_at or started) - started:.2f} s, "
                        f"{rate:.1f} tok/s]",
                        file=sys.stderr,
                    )
                elif isinstance(event, Failed):
                    print(f"error: {event.message}", file=sys.stderr)
                    code = 1
        nursery.cancel_scope.cancel()
    return code
