from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trioserve.engine.events import Event, Finished, TokenDelta
from trioserve.engine.params import GenerationRequest, SamplingParams
from trioserve.engine.scheduler import Engine, EngineConfig, EngineStats
from trioserve.models.chat_template import chat_prompt_tokens
from trioserve.models.loading import load_model


@pytest.fixture
def open_engine(model_dir: Path) -> Callable[..., AsyncIterator[Engine]]:
    """``async with open_engine(parallel=2) as engine``: a real engine on the real model."""

    @asynccontextmanager
    async def _open(**overrides) -> AsyncIterator[Engine]:
        config = EngineConfig(load=lambda: load_model(model_dir), **overrides)
        engine = Engine(config)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(120):
                await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()

    return _open


def chat_request(
    engine: Engine, prompt: str, max_tokens: int = 24, **sampling
) -> GenerationRequest:
    tokens = chat_prompt_tokens(engine.tokenizer, [{"role": "user", "content": prompt}])
    return GenerationRequest(
        prompt_tokens=tuple(tokens),
        max_tokens=max_tokens,
        sampling=SamplingParams(**sampling),
        request_id=prompt[:20],
    )


async def wait_for(
    engine: Engine, predicate: Callable[[EngineStats], bool], timeout_s: float = 60
) -> EngineStats:
    """Wait until ``predicate(stats)`` holds, re-checked after every worker report; a
    regression fails after ``timeout_s`` instead of hanging the suite."""
    with trio.fail_after(timeout_s):
        stats = engine.stats()
        while not predicate(stats):
            stats = await engine.changed()
        return stats


async def collect(engine: Engine, request: GenerationRequest) -> list[Event]:
    events: list[Event] = []
    with engine.admit(request) as handle:
        await handle.start()
        async for event in handle.events():
            events.append(event)
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def tokens_of(events: list[Event]) -> list[int]:
    return [e.token for e in events if isinstance(e, TokenDelta)]


def finish_of(events: list[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished), f"expected Finished, got {last!r}"
    return last
