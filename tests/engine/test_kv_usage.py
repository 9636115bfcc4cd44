"""The worker's count of the tokens its batch's KV caches hold (``WorkerSnapshot.kv_tokens``,
what ``trioserve:kv_cache_usage_perc`` is made of), checked against the real mlx-lm batch on
the real model: step by step, exactly the tokens read and generated so far."""

from __future__ import annotations

from tests.engine.conftest import chat_request, collect, finish_of, wait_for
from trioserve.engine.events import Finished, PrefillProgress, TokenDelta
from trioserve.engine.worker import Worker, WorkerSnapshot

# Greedy, this runs to max_tokens (tests/integration/test_shutdown.py).
NUMBERS = "Write the numbers from 1 to 500 on one line, separated by commas, with nothing else."


class _Recording(Worker):
    """The real worker; every report it sends (a step's events, the state after the step)
    is kept in ``reports`` on the way."""

    def __init__(self, config, schedule, reports: list) -> None:
        super().__init__(config, schedule)
        self._reports = reports

    async def run_async(self, on_ready, deliver) -> None:
        def recording(events: list, snapshot: WorkerSnapshot) -> None:
            self._reports.append((events, snapshot))
            deliver(events, snapshot)

        await super().run_async(on_ready, recording)


async def test_each_step_reports_exactly_the_tokens_the_batch_holds(open_engine):
    reports: list = []

    def factory(config, schedule):
        return _Recording(config, schedule, reports)

    async with open_engine(parallel=2, prefill_step_size=16, worker_factory=factory) as engine:
        request = chat_request(engine, NUMBERS, max_tokens=12)
        events = await collect(engine, request)
        stats = await wait_for(engine, lambda s: s.worker.in_batch == 0)
    assert finish_of(events).reason == "length"
    assert stats.worker.kv_tokens == 0  # all let go
    prompt = len(request.prompt_tokens)
    generated = 0
    seen = {"prefill": 0, "decode": 0, "end": 0}
    for step_events, snapshot in reports:
        ours = [e for ticket, e in step_events if ticket.request is request]
        if any(isinstance(e, Finished) for e in ours):
            assert snapshot.kv_tokens == 0  # mlx-lm drops a finished sequence in its step
            seen["end"] += 1
        elif tokens := [e for e in ours if isinstance(e, TokenDelta)]:
            generated += len(tokens)
            # The whole prompt, and every token generated so far (each is fed back at once).
            assert snapshot.kv_tokens == prompt + generated, (prompt, generated)
            seen["decode"] += 1
        elif progress := [e for e in ours if isinstance(e, PrefillProgress)]:
            assert snapshot.kv_tokens == progress[-1].processed  # the chunks read so far
            seen["prefill"] += 1
    assert seen["prefill"] >= 2 and seen["decode"] >= 10 and seen["end"] == 1, seen
