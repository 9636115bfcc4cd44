"""The real engine on the real embedded model: answers, batching, progress, cancellation."""

from __future__ import annotations

import functools
import threading
import time

import trio
import trio.lowlevel

from tests.engine.conftest import (
    chat_request,
    collect,
    finish_of,
    text_of,
    tokens_of,
    wait_for,
)
from trioserve.engine.events import Failed, Finished, PrefillProgress, TokenDelta
from trioserve.engine.worker import Worker

LONG_PROMPT = "Summarize this text. " + " ".join(
    f"Sentence number {i} talks about the weather in a small town." for i in range(30)
)


async def test_greedy_answer_names_paris(open_engine):
    async with open_engine(parallel=1) as engine:
        events = await collect(engine, chat_request(engine, "What is the capital of France?"))
    assert "Paris" in text_of(events)
    finish = finish_of(events)
    assert finish.usage.completion_tokens == len(tokens_of(events))
    assert finish.usage.prompt_tokens > 5


async def test_concurrent_greedy_requests_match_their_solo_runs(open_engine):
    prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Write a haiku about the sea.",
        "What is two plus two?",
    ]
    async with open_engine(parallel=4) as engine:
        solo = [tokens_of(await collect(engine, chat_request(engine, p))) for p in prompts]
        together: dict[int, list[int]] = {}

        async def run(i: int, prompt: str) -> None:
            together[i] = tokens_of(await collect(engine, chat_request(engine, prompt)))

        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(prompts):
                nursery.start_soon(run, i, prompt)
    # Not bit-exact by guarantee: a batch of 4 runs GEMMs where a solo run has GEMVs, and
    # float sums in another order can flip a near-tie deep into an answer. What batching
    # must never do is mix sequences up or corrupt one: each answer starts as its solo run
    # does (the first tokens have clear margins on these prompts) and is a real answer.
    for i, tokens in enumerate(solo):
        assert tokens, f"prompt {i} generated nothing"
        assert together[i][:4] == tokens[:4], f"prompt {i} starts differently when batched"
        assert len(together[i]) >= 4


async def test_prefill_progress_is_monotonic_and_ends_at_prompt_length(open_engine):
    async with open_engine(parallel=1, prefill_step_size=16) as engine:
        request = chat_request(engine, LONG_PROMPT, max_tokens=2)
        events = await collect(engine, request)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert len(progress) >= 3
    processed = [p.processed for p in progress]
    assert processed == sorted(processed)
    assert all(p.total == len(request.prompt_tokens) for p in progress)
    assert processed[-1] == len(request.prompt_tokens)
    first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenDelta))
    assert all(isinstance(e, PrefillProgress) for e in events[:first_token])


async def _cancel_after(engine, request, predicate) -> int:
    """Consume events until ``predicate(event)``, then leave the scope. Returns the
    worker's step count at the moment of the cancel."""
    with trio.CancelScope() as scope:
        with engine.admit(request) as handle:
            await handle.start()
            async for event in handle.events():
                assert not isinstance(event, Finished | Failed), "finished before the cancel"
                if predicate(event):
                    steps = engine.stats().worker.steps
                    scope.cancel()
                    await trio.lowlevel.checkpoint()  # the cancel lands here, inside the block
    assert scope.cancelled_caught
    return steps


async def _assert_released_within_one_step(engine, steps_at_cancel: int) -> None:
    stats = await wait_for(engine, lambda s: s.worker.in_batch == 0)
    assert stats.slots_busy == 0
    assert stats.worker.tracked == 0
    # The step running at the cancel may finish; the next one already lacks the sequence.
    assert stats.worker.steps <= steps_at_cancel + 2


async def test_cancel_mid_prefill_frees_slot_and_batch(open_engine):
    async with open_engine(parallel=1, prefill_step_size=16) as engine:
        request = chat_request(engine, LONG_PROMPT, max_tokens=50)
        steps = await _cancel_after(engine, request, lambda e: isinstance(e, PrefillProgress))
        await _assert_released_within_one_step(engine, steps)
        # The engine still answers normally afterwards.
        events = await collect(engine, chat_request(engine, "What is the capital of France?"))
        assert "Paris" in text_of(events)


async def test_cancel_mid_decode_frees_slot_and_batch(open_engine):
    async with open_engine(parallel=1) as engine:
        request = chat_request(engine, "Tell me a long story about a dragon.", max_tokens=200)
        steps = await _cancel_after(engine, request, lambda e: isinstance(e, TokenDelta))
        await _assert_released_within_one_step(engine, steps)
        events = await collect(engine, chat_request(engine, "What is the capital of France?"))
        assert "Paris" in text_of(events)


async def test_cancel_while_queued_leaves_the_queue_and_never_enters_the_batch(open_engine):
    async with open_engine(parallel=1) as engine:
        first = chat_request(engine, "Tell me a long story about a dragon.", max_tokens=40)
        queued = chat_request(engine, "What is two plus two?", max_tokens=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, engine, first)
            await wait_for(engine, lambda s: s.slots_busy == 1)
            with trio.CancelScope() as scope:
                with engine.admit(queued) as handle:

                    async def consume() -> None:
                        await handle.start()
                        async for _ in handle.events():
                            raise AssertionError("a queued request got an event")

                    async with trio.open_nursery() as inner:
                        inner.start_soon(consume)
                        await wait_for(engine, lambda s: s.queue_length == 1)
                        assert handle.queue_position() == 1
                        assert handle.phase == "queued"
                        scope.cancel()
            assert engine.stats().queue_length == 0
            assert engine.stats().slots_busy == 1  # the first request keeps its slot
        stats = await wait_for(engine, lambda s: s.worker.in_batch == 0)
        assert stats.slots_busy == 0


async def test_stop_string_is_left_out_and_finishes_with_stop(open_engine):
    async with open_engine(parallel=1) as engine:
        plain = text_of(await collect(engine, chat_request(engine, "Count from 1 to 10.")))
        assert "4" in plain, plain
        request = chat_request(engine, "Count from 1 to 10.")
        request = type(request)(**{**request.__dict__, "stop": ("4",)})
        events = await collect(engine, request)
    text = text_of(events)
    assert "4" not in text
    assert plain.startswith(text)
    assert finish_of(events).reason == "stop"


async def test_length_finish_reason_at_max_tokens(open_engine):
    async with open_engine(parallel=1) as engine:
        events = await collect(engine, chat_request(engine, "Tell me a story.", max_tokens=3))
    finish = finish_of(events)
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 3


async def test_same_seed_same_output_whatever_shares_the_batch(open_engine):
    async with open_engine(parallel=3) as engine:
        seeded = chat_request(engine, "Invent a name for a cat.", temperature=1.0, seed=7)
        alone = tokens_of(await collect(engine, seeded))
        results: dict[str, list[int]] = {}

        async def run(name, request) -> None:
            results[name] = tokens_of(await collect(engine, request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "seeded", seeded)
            other = chat_request(engine, "Invent a name for a dog.", temperature=1.0, seed=99)
            nursery.start_soon(run, "other", other)
            nursery.start_soon(run, "greedy", chat_request(engine, "Name a fruit."))
    # The seeded sampler owns its PRNG key, so its draws do not depend on the batch; the
    # logits it draws from can differ in the last bits between batch shapes (see above),
    # so the runs must agree where those bits cannot matter: the first tokens.
    assert alone and results["seeded"][:4] == alone[:4]


async def test_prefix_cache_serves_the_shared_history_of_a_second_turn(open_engine):
    from trioserve.engine.params import GenerationRequest
    from trioserve.models.chat_template import chat_prompt_tokens

    async with open_engine(parallel=1, prefix_cache_bytes=256 * 1024 * 1024) as engine:
        first = chat_request(engine, LONG_PROMPT, max_tokens=8)
        first_events = await collect(engine, first)
        assert finish_of(first_events).usage.cached_tokens == 0
        history = [
            {"role": "user", "content": LONG_PROMPT},
            {"role": "assistant", "content": text_of(first_events)},
            {"role": "user", "content": "Now say it in one word."},
        ]
        tokens = chat_prompt_tokens(engine.tokenizer, history)
        second = GenerationRequest(prompt_tokens=tuple(tokens), max_tokens=8, request_id="t2")
        events = await collect(engine, second)
    usage = finish_of(events).usage
    assert usage.cached_tokens >= len(first.prompt_tokens)
    assert usage.prompt_tokens == len(tokens)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    # Progress speaks of the whole prompt, cached part included.
    assert progress[-1].processed == progress[-1].total == len(tokens)
    assert text_of(events).strip()


async def test_worker_reports_idle_once_work_ends_and_busy_while_it_runs(open_engine):
    async with open_engine(parallel=1) as engine:
        await wait_for(engine, lambda s: s.worker.idle)  # after start-up's warm-up
        with engine.admit(chat_request(engine, "Name a colour.", 8)) as handle:
            await handle.start()
            async for _ in handle.events():
                assert not engine.stats().worker.idle  # a step has run since
        stats = await wait_for(engine, lambda s: s.worker.idle)
        assert stats.worker.in_batch == 0


VERY_LONG_PROMPT = "Summarize this text. " + " ".join(
    f"Sentence number {i} talks about the weather in a small town." for i in range(70)
)


class _PausesInItsSecondChunk(Worker):
    """The real worker, but in the second prefill chunk it stops at a layer checkpoint
    (at most 30 s), says so through ``paused``, and waits until a command arrives. The test
    sends its cancel only once ``paused`` is set, so the cancel lands mid-chunk on any
    machine, however fast or busy: it can neither race the chunk nor reach the worker
    between two steps (where it would be a plain drop, not a cut)."""

    def __init__(self, *args, paused: threading.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._checkpoints = 0
        self._paused = paused

    def _prefill_checkpoint(self) -> None:
        self._checkpoints += 1
        per_chunk = len(self._model.layers) - 1  # a gate between every two layers
        if self._checkpoints == per_chunk + 2:  # two layers into the second chunk
            self._paused.set()
            deadline = time.monotonic() + 30
            while self.commands.empty() and time.monotonic() < deadline:
                time.sleep(0.005)
        super()._prefill_checkpoint()


async def test_cancel_mid_prefill_cuts_the_chunk_between_layers(open_engine):
    # Alone, the prompt is read in 400-token chunks. The worker stops two layers into the
    # second chunk and waits there; the cancel goes in once it is waiting.
    paused = threading.Event()
    factory = functools.partial(_PausesInItsSecondChunk, paused=paused)
    async with open_engine(
        parallel=1, solo_prefill_step_size=400, worker_factory=factory
    ) as engine:
        request = chat_request(engine, VERY_LONG_PROMPT, max_tokens=20)
        assert len(request.prompt_tokens) > 800
        with trio.CancelScope() as scope:
            with engine.admit(request) as handle:
                await handle.start()
                async for event in handle.events():
                    assert not isinstance(event, Finished | Failed), "finished before the cancel"
                    if isinstance(event, PrefillProgress):
                        break
                assert await trio.to_thread.run_sync(paused.wait, 30), "never paused"
                steps = engine.stats().worker.steps
                scope.cancel()
                await trio.lowlevel.checkpoint()  # the cancel lands here, inside the block
        assert scope.cancelled_caught
        await _assert_released_within_one_step(engine, steps)
        assert engine.stats().worker.prefill_cuts == 1
        assert engine.stats().worker.failures == 0
        # The fresh batch after the cut answers normally.
        events = await collect(engine, chat_request(engine, "What is the capital of France?"))
        assert "Paris" in text_of(events)


async def test_a_cancel_never_cuts_a_chunk_that_another_sequence_needs(open_engine):
    async with open_engine(parallel=2, solo_prefill_step_size=400) as engine:
        question = chat_request(engine, "What is the capital of France?", max_tokens=40)
        solo = await collect(engine, question)
        async with trio.open_nursery() as nursery:
            shared: list = []

            async def ask() -> None:
                shared.extend(await collect(engine, question))

            nursery.start_soon(ask)
            request = chat_request(engine, VERY_LONG_PROMPT, max_tokens=20)
            await _cancel_after(engine, request, lambda e: isinstance(e, PrefillProgress))
        assert engine.stats().worker.prefill_cuts == 0
        # The question shared a batch with the cancelled prompt for a while: the same answer
        # start and a normal finish (bit-exactness across batch shapes is not guaranteed).
        assert tokens_of(shared)[:4] == tokens_of(solo)[:4]
        assert finish_of(shared).reason in ("stop", "length")
