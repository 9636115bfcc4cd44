"""Faults at the real seams of the real worker, on the real model: each fails its own
request (or, for the model step, its batch) and the engine goes on serving.

The faults come from ``trioserve.testing.faults.FaultyWorker``: the production worker with
one component swapped for one that raises where a real bug or native error would.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import trio

from tests.engine.conftest import chat_request, collect, finish_of, text_of, wait_for
from trioserve.engine.events import Failed, Finished
from trioserve.engine.scheduler import EngineNotReady
from trioserve.testing.faults import FaultyWorker


def _faulty(engine, kind: str, prompt: str = "Tell me a story.", max_tokens: int = 20, **kw):
    request = chat_request(engine, prompt, max_tokens=max_tokens, **kw)
    return replace(request, request_id=f"r-fault-{kind}")


async def _healthy_after(engine) -> None:
    stats = await wait_for(engine, lambda s: s.worker.in_batch == 0 and s.slots_busy == 0)
    assert stats.worker.tracked == 0
    good = await collect(engine, chat_request(engine, "What is the capital of France?"))
    assert "Paris" in text_of(good)


@pytest.mark.parametrize("kind", ["prefill", "decode", "detokenizer", "sampler"])
async def test_a_per_request_fault_fails_only_that_request(open_engine, kind):
    async with open_engine(parallel=2, worker_factory=FaultyWorker) as engine:
        sampling = {"temperature": 0.7, "seed": 3} if kind == "sampler" else {}
        bad = _faulty(engine, kind, **sampling)
        neighbour = chat_request(engine, "Count from 1 to 20.", max_tokens=30)
        results: dict[str, list] = {}

        async def run(name, request) -> None:
            results[name] = await collect(engine, request)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "neighbour", neighbour)
                nursery.start_soon(run, "bad", bad)
        assert isinstance(results["bad"][-1], Failed), results["bad"][-1]
        assert "InjectedFault" in results["bad"][-1].message
        # Exactly one terminal event.
        assert sum(isinstance(e, Finished | Failed) for e in results["bad"]) == 1
        # The sequence next to it in the same batch finished normally.
        assert finish_of(results["neighbour"]).usage.completion_tokens > 0
        assert engine.stats().worker.failures == 1
        await _healthy_after(engine)


async def test_a_failing_prefix_cache_store_loses_only_the_reuse(open_engine):
    async with open_engine(
        parallel=1, worker_factory=FaultyWorker, prefix_cache_bytes=64 * 1024 * 1024
    ) as engine:
        events = await collect(engine, _faulty(engine, "cache-store", max_tokens=5))
        # The answer was complete before the store: it still arrives whole.
        assert finish_of(events).usage.completion_tokens > 0
        assert engine.stats().worker.prefix_cache_bytes == 0
        await _healthy_after(engine)


async def test_a_model_step_fault_fails_the_batch_and_the_engine_starts_afresh(open_engine):
    async with open_engine(parallel=2, worker_factory=FaultyWorker) as engine:
        results: dict[str, list] = {}

        async def run(name, request) -> None:
            results[name] = await collect(engine, request)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "bad", _faulty(engine, "batch"))
                nursery.start_soon(run, "other", chat_request(engine, "Tell me another story."))
        assert isinstance(results["bad"][-1], Failed)
        # The other sequence was in the failed step (if it had entered the batch by then):
        # it failed with a clear message, or it ran in the fresh batch afterwards.
        last = results["other"][-1]
        assert isinstance(last, Finished) or "InjectedFault" in last.message
        await _healthy_after(engine)


async def test_a_native_panic_ends_the_engine_and_fails_everything_outstanding(model_dir):
    from trioserve.engine.scheduler import Engine, EngineConfig
    from trioserve.engine.worker import WorkerCrashed
    from trioserve.models.loading import load_model

    engine = Engine(
        EngineConfig(load=lambda: load_model(model_dir), parallel=1, worker_factory=FaultyWorker)
    )
    crashed: list[BaseException] = []
    results: dict[str, object] = {}

    async def run_engine(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await engine.run(task_status=task_status)
        except WorkerCrashed as exc:  # Engine.run re-raises the worker's own error
            crashed.append(exc)

    async def consume(name: str, handle, *, start: bool) -> None:
        try:
            if start:
                await handle.start()
            results[name] = [event async for event in handle.events()]
        except EngineNotReady as exc:
            results[name] = exc

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_engine)
            # Admission is synchronous: both are in the engine before the worker can step.
            with (
                engine.admit(_faulty(engine, "crash")) as running,
                engine.admit(chat_request(engine, "Hi.")) as queued,
            ):
                await running.start()  # the one slot; the other waits behind it
                async with trio.open_nursery() as consumers:
                    consumers.start_soon(partial(consume, "queued", queued, start=True))
                    consumers.start_soon(partial(consume, "crash", running, start=False))
    assert len(crashed) == 1 and isinstance(crashed[0].__cause__, BaseException)
    crash = results["crash"]
    assert isinstance(crash[-1], Failed) and "SimulatedPanic" in crash[-1].message
    assert isinstance(results["queued"], EngineNotReady)
    assert "SimulatedPanic" in str(results["queued"])
    assert engine.failure and "SimulatedPanic" in engine.failure
    assert engine.stats().slots_busy == 0 and engine.stats().queue_length == 0
    with pytest.raises(EngineNotReady, match="SimulatedPanic"):
        with engine.admit(chat_request(engine, "Hi.")):
            pass
