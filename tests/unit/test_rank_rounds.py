"""What rank 0 sends the other ranks each round (engine/distributed/rounds.py), and the
leader's watchdog, without mlx.launch (tests/integration/test_ranks.py runs three ranks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from trioserve.engine.constraints import json_schema_constraint
from trioserve.engine.distributed import rounds
from trioserve.engine.distributed.leader import LeaderWorker, RanksStalled, leader_factory
from trioserve.engine.distributed.rounds import Insert, Remove
from trioserve.engine.params import GenerationRequest, SamplingParams
from trioserve.engine.worker import WorkerConfig


def test_a_round_of_operations_survives_the_trip():
    request = GenerationRequest(
        prompt_tokens=(1, 2, 3),
        max_tokens=5,
        stop=("x",),
        sampling=SamplingParams(temperature=0.7, seed=4),
        request_id="r1",
    )
    ops = [Insert(request, cached=2), Remove(uid=7, keep_cache=True)]
    assert rounds.decode(rounds.encode(ops)) == ops
    assert rounds.encode([]) == b"" and rounds.decode(b"") == []


def test_a_constraint_travels_as_its_grammar_text():
    constraint = json_schema_constraint({"type": "object", "properties": {"a": {"type": "string"}}})
    # A compiled grammar (GrammarProcessor) keeps its Constraint; its `make` may be a closure.
    compiled = SimpleNamespace(constraint=constraint, label=constraint.label)
    request = GenerationRequest(prompt_tokens=(1,), max_tokens=3, constraint=compiled)
    (sent,) = rounds.decode(rounds.encode([Insert(rounds.portable(request), 0)]))
    assert sent.request.constraint.label == "json_schema"
    assert sent.request.constraint.grammar() == constraint.grammar()


def test_the_digest_tells_steps_apart():
    step = [SimpleNamespace(uid=0, token=5), SimpleNamespace(uid=1, token=9)]
    same = [SimpleNamespace(uid=0, token=5), SimpleNamespace(uid=1, token=9)]
    other = [SimpleNamespace(uid=0, token=5), SimpleNamespace(uid=1, token=8)]
    assert rounds.digest(step) == rounds.digest(same)
    assert rounds.digest(step) != rounds.digest(other)
    assert 0 <= rounds.digest(step) < rounds.DIGEST_MODULUS


def test_the_rank_timeout_must_be_positive():
    with pytest.raises(ValueError):
        leader_factory(SimpleNamespace(), 0)


async def test_the_watchdog_gives_up_on_ranks_that_stop_answering():
    """A worker thread stuck inside a collective: run_async fails within the rank timeout
    and leaves the thread behind (it is released here only to end the test)."""
    import threading

    release = threading.Event()

    class Stuck(LeaderWorker):
        def run(self, on_ready, deliver):  # stands for a thread blocked in all_sum
            self._progress()
            release.wait(30)

    group = SimpleNamespace(rank=0, size=3, leader=True)
    worker = Stuck(WorkerConfig(parallel=1, prefill_step_size=8), lambda *a: None, group, 0.5)
    started = trio.current_time()
    try:
        with pytest.raises(RanksStalled, match="--rank-timeout"):
            await worker.run_async(lambda tokenizer: None, lambda events, snapshot: None)
    finally:
        release.set()
    # Real time (a thread is involved): given up after 0.5 s, long before it would end.
    assert 0.5 <= trio.current_time() - started < 10
