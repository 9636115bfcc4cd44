"""The cancellation matrix: every moment of a stream × every way it can be cut short.

Runs the real scheduler, session, assembler and SSE body over the scripted ``FakeWorker``
under ``MockClock``: exact interleavings, milliseconds per cell. Each cell asserts the same
invariants: the slot is free, the worker tracks nothing, the queue is empty, at most one
terminal frame was sent and nothing after ``[DONE]``, the terminal is the expected one, and
exactly one log line ends the request, carrying its id.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from trioserve.api.dialects.chat import ChunkRenderer
from trioserve.drain import Drain
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.output.assembler import Assembler
from trioserve.output.chunks import ChunkBuilder
from trioserve.streaming.stream import Generation, SSEBody, StreamOptions
from trioserve.testing.fake_worker import FakeCrash, FakeWorker

MOMENTS = ["queued", "prefill", "decode", "finished_unread", "after_done"]
CAUSES = ["disconnect", "send_timeout", "drain", "queue_timeout", "crash", "fault"]

# (moment, cause) -> the stream's terminal: "finish", "none" (the client left), or
# "error:<code>". Cells that cannot happen are absent (a queue timeout needs the queue; a
# send timeout needs frames the client does not take while generation still runs).
EXPECTED: dict[tuple[str, str], str] = {
    ("queued", "disconnect"): "none",
    ("queued", "drain"): "error:server_shutdown",
    ("queued", "queue_timeout"): "error:queue_timeout",
    ("queued", "crash"): "error:engine_unavailable",
    ("prefill", "disconnect"): "none",
    ("prefill", "send_timeout"): "none",
    ("prefill", "drain"): "error:server_shutdown",
    ("prefill", "crash"): "error:generation_failed",
    ("prefill", "fault"): "error:generation_failed",
    ("decode", "disconnect"): "none",
    ("decode", "send_timeout"): "none",
    ("decode", "drain"): "error:server_shutdown",
    ("decode", "crash"): "error:generation_failed",
    ("decode", "fault"): "error:generation_failed",
    # Generation is over: nothing can change the answer any more, only whether it is read.
    ("finished_unread", "disconnect"): "none",
    ("finished_unread", "drain"): "finish",
    ("finished_unread", "crash"): "finish",
    ("finished_unread", "fault"): "finish",
    ("after_done", "disconnect"): "finish",
    ("after_done", "drain"): "finish",
    ("after_done", "crash"): "finish",
    ("after_done", "fault"): "finish",
}

ENDING_PHRASES = (
    " done: ",
    " aborted by the client ",
    " cancelled by the shutdown ",
    " dropped (",
    " ended without an answer ",
)
PROMPT_TOKENS = 40  # five prefill chunks of 8
MAX_TOKENS = 100  # enough frames to fill the 64-frame buffer of a stalled client


def _request(request_id: str, max_tokens: int = MAX_TOKENS) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=tuple(range(1, PROMPT_TOKENS + 1)),
        max_tokens=max_tokens,
        request_id=request_id,
    )


def _payload(frame: bytes) -> dict | str | None:
    for line in frame.decode().splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            return data if data == "[DONE]" else json.loads(data)
    return None


def _at_moment(moment: str, frame: bytes, engine: Engine) -> bool:
    payload = _payload(frame)
    if not isinstance(payload, dict):
        return False
    if moment == "queued":
        return payload.get("status") == "queued"
    if moment == "prefill":
        return payload.get("status") == "processing" and 0 < payload["n_past"] < PROMPT_TOKENS
    if moment in ("decode", "finished_unread"):
        choices = payload.get("choices") or []
        return bool(choices) and bool(choices[0].get("delta", {}).get("content"))
    return False


@pytest.mark.parametrize(("moment", "cause"), sorted(EXPECTED))
async def test_cell(moment, cause, autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    factory = FakeWorker.factory(step_s=0.1, chunk=8)
    engine = Engine(
        EngineConfig(
            load=lambda: (None, None),
            parallel=1,
            queue_timeout_s=5.0 if cause == "queue_timeout" else None,
            worker_factory=factory,
        )
    )
    drain = Drain(grace_s=1.0)
    request_id = f"cell-{moment}-{cause}"
    frames: list[bytes] = []
    crashed: list[BaseException] = []

    async def run_engine(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await engine.run(task_status=task_status)
        except FakeCrash as exc:
            crashed.append(exc)

    async def hold_the_slot(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with engine.admit(_request("blocker", max_tokens=10_000)) as handle:
            await handle.start()
            task_status.started()
            async for _ in handle.events():
                pass

    with trio.fail_after(600):  # mock time: a stuck cell fails instead of hanging
        async with trio.open_nursery() as nursery:
            await nursery.start(run_engine)
            worker: FakeWorker = factory.created[0]
            blocker = trio.CancelScope()
            if moment == "queued":
                nursery.start_soon(_run_in, blocker, hold_the_slot)
                await trio.testing.wait_all_tasks_blocked()
            options = StreamOptions(
                heartbeat_interval_s=0.5,
                send_timeout_s=1.0 if cause == "send_timeout" else None,
                drain=drain,
            )
            assembler = Assembler(_renderer(), progress=True)
            # After generation, all of a short answer's frames fit in the stream's buffer:
            # the writer is done and only the client's reading is left.
            short = moment in ("finished_unread", "after_done")
            request = _request(request_id, max_tokens=10 if short else MAX_TOKENS)
            body = SSEBody(Generation(engine, request), assembler, options)

            def apply_cause() -> None:
                if cause == "drain":
                    drain.expire()
                elif cause == "crash":
                    worker.crash()
                elif cause == "fault":
                    worker.fail(request_id)

            with trio.CancelScope() as client:
                async with body:
                    triggered = False
                    async for frame in body:
                        frames.append(frame)
                        if triggered or not _at_moment(moment, frame, engine):
                            continue
                        triggered = True
                        if moment == "finished_unread":
                            # The client reads nothing more until generation is over...
                            await worker.finished_event(request_id).wait()
                            await trio.testing.wait_all_tasks_blocked()
                            # ...and the slot is already free, frames still unread.
                            assert engine.stats().slots_busy == 0
                        if cause == "disconnect":
                            client.cancel()
                        elif cause == "send_timeout":
                            await trio.sleep(3600)  # stops reading; the stream is dropped
                        else:
                            apply_cause()
                    if moment == "after_done":
                        apply_cause()
                        if cause == "disconnect":
                            client.cancel()
                        await trio.sleep(1)
            blocker.cancel()
            await trio.sleep(0.25)  # mock time: the worker takes its commands within a step
            stats = engine.stats()
            assert stats.slots_busy == 0, "slot leaked"
            assert stats.queue_length == 0, "queue entry leaked"
            if not crashed:
                assert worker.tracked == 0, "the worker still holds the sequence"
            nursery.cancel_scope.cancel()

    if cause == "crash" and moment not in ("finished_unread", "after_done"):
        assert crashed, "the fake worker did not crash"  # (later, it has nothing to step)

    payloads = [_payload(f) for f in frames]
    dones = [i for i, p in enumerate(payloads) if p == "[DONE]"]
    assert len(dones) <= 1 and (not dones or dones[0] == len(payloads) - 1), "after [DONE]"
    errors = [p["error"] for p in payloads if isinstance(p, dict) and "error" in p]
    finishes = [
        p
        for p in payloads
        if isinstance(p, dict) and p.get("choices") and p["choices"][0].get("finish_reason")
    ]
    assert len(errors) + len(finishes) <= 1, "more than one terminal frame"
    expected = EXPECTED[(moment, cause)]
    if expected == "none":
        assert not dones and not errors and not finishes
    elif expected == "finish":
        assert finishes and dones and not errors
    else:
        assert errors and dones and not finishes
        assert errors[0]["code"] == expected.removeprefix("error:")

    endings = [
        r.getMessage()
        for r in caplog.records
        if request_id in r.getMessage() and any(p in r.getMessage() for p in ENDING_PHRASES)
    ]
    assert len(endings) == 1, endings


async def _run_in(scope: trio.CancelScope, fn, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await fn()


def test_every_cell_of_the_matrix_is_decided():
    """Each (moment, cause) is either in the table or impossible for a stated reason."""
    impossible = {
        ("queued", "send_timeout"): "no frames but heartbeats, which never block",
        ("queued", "fault"): "a queued request is not in the worker",
        ("prefill", "queue_timeout"): "the queue is behind it",
        ("decode", "queue_timeout"): "the queue is behind it",
        ("finished_unread", "queue_timeout"): "the queue is behind it",
        ("finished_unread", "send_timeout"): "the writer is done: nothing left to time",
        ("after_done", "queue_timeout"): "the queue is behind it",
        ("after_done", "send_timeout"): "nothing left to send",
    }
    for moment in MOMENTS:
        for cause in CAUSES:
            assert ((moment, cause) in EXPECTED) != ((moment, cause) in impossible)


def _renderer() -> ChunkRenderer:
    return ChunkRenderer(ChunkBuilder.new("chat", "m"), logprobs=False, include_usage=False)
