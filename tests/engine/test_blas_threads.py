"""``blas_threads="auto"`` on the real model, the real OpenBLAS and this machine's /proc: the
engine takes the second core while nothing else runs and gives it back as soon as other
processes keep the cores busy, and answers all the while (engine/blas_threads.py)."""

from __future__ import annotations

import sys

import pytest
import trio

from tests.engine.conftest import chat_request, collect, finish_of, tokens_of
from trioserve.blas import thread_setter
from trioserve.engine.blas_threads import read_cpu_seconds, usable_cores

pytestmark = [
    pytest.mark.skipif(usable_cores() < 2, reason="needs two cores: with one, auto keeps one"),
    pytest.mark.skipif(thread_setter() is None, reason="no OpenBLAS loaded: nothing to set"),
]

NUMBERS = "Write the numbers from 1 to 500 on one line, separated by commas, with nothing else."


async def others_busy(seconds: float = 1.0) -> float:
    """Cores other processes kept busy over ``seconds`` (this process asleep meanwhile)."""
    busy0, own0 = read_cpu_seconds()
    await trio.sleep(seconds)
    busy1, own1 = read_cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


async def generate_until(engine, predicate, timeout_s: float) -> list[int]:
    """Greedy answers, one after another, until ``predicate(threads)``; their token counts."""
    counts = []
    with trio.move_on_after(timeout_s):
        while not predicate(engine.stats().worker.blas_threads):
            events = await collect(engine, chat_request(engine, NUMBERS, max_tokens=24))
            assert finish_of(events).reason == "length"
            counts.append(len(tokens_of(events)))
    return counts


async def test_auto_takes_a_free_core_and_gives_it_back_to_busy_neighbours(open_engine):
    quiet = await others_busy()
    if quiet > 0.15:  # auto would rightly stay at one thread: nothing to observe
        pytest.skip(f"other processes keep {quiet:.2f} cores busy here; needs a quiet machine")
    async with open_engine(parallel=1, blas_threads="auto") as engine:
        counts = await generate_until(engine, lambda n: n == 2, timeout_s=30)
        assert engine.stats().worker.blas_threads == 2, f"stayed at one thread ({counts})"
        spin = [sys.executable, "-c", "while True: pass"]
        spinners = [await trio.lowlevel.open_process(spin) for _ in range(usable_cores())]
        try:
            counts = await generate_until(engine, lambda n: n == 1, timeout_s=30)
        finally:
            for spinner in spinners:
                spinner.kill()
                await spinner.wait()
        stats = engine.stats()
        assert stats.worker.blas_threads == 1, f"kept two threads beside busy cores ({counts})"
        assert stats.worker.blas_thread_changes == 2
