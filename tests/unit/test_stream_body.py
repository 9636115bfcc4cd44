"""The SSE body's side tasks on the fake worker under MockClock: heartbeats and keepalives."""

from __future__ import annotations

import json

import trio

from trioserve.api.dialects.chat import ChunkRenderer
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.output.assembler import Assembler
from trioserve.output.chunks import ChunkBuilder
from trioserve.streaming.stream import Generation, Pending, SSEBody, StartFailed, StreamOptions
from trioserve.testing.fake_worker import FakeWorker


def _request(request_id: str, prompt: int = 40, max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(tuple(range(1, prompt + 1)), max_tokens, request_id=request_id)


async def _stream(engine: Engine, request: GenerationRequest, options: StreamOptions, **kw):
    assembler = Assembler(_renderer(), **kw)
    async with SSEBody(Generation(engine, request), assembler, options) as body:
        return [frame async for frame in body]


async def _with_engine(fn, *, step_s: float = 0.1):
    engine = Engine(
        EngineConfig(
            load=lambda: (None, None), parallel=1, worker_factory=FakeWorker.factory(step_s=step_s)
        )
    )
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            result = await fn(engine)
            nursery.cancel_scope.cancel()
    return result


async def test_a_queued_stream_gets_heartbeats_with_its_queue_position(autojump_clock):
    async def scenario(engine: Engine):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stream, engine, _request("first", max_tokens=50), StreamOptions())
            await trio.testing.wait_all_tasks_blocked()
            options = StreamOptions(heartbeat_interval_s=0.5)
            return await _stream(engine, _request("second"), options, progress=True)

    frames = await _with_engine(scenario)
    progress = [
        json.loads(f.decode().split("data: ", 1)[1])
        for f in frames
        if f.startswith(b"event: prefill_progress")
    ]
    queued = [p for p in progress if p["status"] == "queued"]
    assert queued and all(p["queue_position"] == 1 for p in queued)
    assert progress[-1]["fraction"] == 1.0  # closed at 1.0 before the first content
    first_content = next(i for i, f in enumerate(frames) if b'"role"' in f)
    assert all(not f.startswith(b"event:") for f in frames[first_content:])
    assert frames[-1] == b"data: [DONE]\n\n"


async def test_keepalive_comments_fill_silences_and_stop_with_the_stream(autojump_clock):
    async def scenario(engine: Engine):
        options = StreamOptions(keepalive_s=0.25)
        return await _stream(engine, _request("slow", prompt=40, max_tokens=2), options)

    frames = await _with_engine(scenario, step_s=1.0)  # five 1-s prefill steps of silence
    comments = [f for f in frames if f.startswith(b":")]
    assert len(comments) >= 5
    assert frames[-1] == b"data: [DONE]\n\n"


async def test_no_keepalive_comments_unless_asked(autojump_clock):
    async def scenario(engine: Engine):
        return await _stream(engine, _request("quiet", max_tokens=2), StreamOptions())

    frames = await _with_engine(scenario, step_s=1.0)
    assert not [f for f in frames if f.startswith(b":")]


def _renderer() -> ChunkRenderer:
    return ChunkRenderer(ChunkBuilder.new("chat", "m"), logprobs=False, include_usage=False)


def _pending(start, model: str = "m") -> Pending:
    return Pending(model, start)


async def _stream_pending(pending: Pending, options: StreamOptions, closed: list[str], **kw):
    assembler = Assembler(_renderer(), **kw)
    async with SSEBody(pending, assembler, options, on_close=lambda: closed.append("x")) as body:
        return [frame async for frame in body]


async def test_a_pending_stream_sends_loading_progress_then_the_answer(autojump_clock):
    async def scenario(engine: Engine):
        async def start() -> Generation:
            await trio.sleep(3)  # the model loads
            return Generation(engine, _request("late"))

        closed: list[str] = []
        options = StreamOptions(heartbeat_interval_s=1.0)
        frames = await _stream_pending(_pending(start), options, closed, progress=True)
        return frames, closed

    frames, closed = await _with_engine(scenario)
    first_content = next(i for i, f in enumerate(frames) if b'"role"' in f)
    loading = [json.loads(f.decode().split("data: ", 1)[1]) for f in frames[:first_content]]
    assert len(loading) >= 2 and all(p["status"] == "loading" for p in loading[:2])
    assert all(p["choices"] == [] and p["model"] == "m" for p in loading[:2])
    assert all("n_past" not in p for p in loading[:2])  # the prompt is not known yet
    assert frames[-1] == b"data: [DONE]\n\n" and closed == ["x"]


async def test_a_pending_stream_without_progress_sends_only_comments(autojump_clock):
    async def scenario(engine: Engine):
        async def start() -> Generation:
            await trio.sleep(3)
            return Generation(engine, _request("late"))

        closed: list[str] = []
        return await _stream_pending(
            _pending(start), StreamOptions(heartbeat_interval_s=1.0), closed
        )

    frames = await _with_engine(scenario)
    first_content = next(i for i, f in enumerate(frames) if b'"role"' in f)
    assert first_content >= 2 and all(f.startswith(b":") for f in frames[:first_content])


async def test_a_failed_start_ends_the_stream_with_an_error_frame(autojump_clock):
    async def start() -> Generation:
        await trio.sleep(1.5)
        raise StartFailed("the model 'm' failed", "model_failed")

    closed: list[str] = []
    frames = await _stream_pending(_pending(start), StreamOptions(heartbeat_interval_s=1.0), closed)
    error = json.loads(frames[-2].decode().split("data: ", 1)[1])["error"]
    assert error["code"] == "model_failed" and "failed" in error["message"]
    assert frames[-1] == b"data: [DONE]\n\n" and closed == ["x"]


async def test_a_client_gone_during_the_start_cancels_it_and_closes_once(autojump_clock):
    cancelled: list[bool] = []

    async def start() -> Generation:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    closed: list[str] = []
    assembler = Assembler(_renderer(), progress=True)
    with trio.move_on_after(5):  # the client hangs up while the model loads
        async with SSEBody(
            _pending(start), assembler, StreamOptions(), on_close=lambda: closed.append("x")
        ) as body:
            async for _ in body:
                pass
    assert cancelled == [True] and closed == ["x"]


async def test_an_unexpected_error_in_the_start_is_an_internal_error_frame(autojump_clock):
    async def start() -> Generation:
        raise KeyError("bug")

    closed: list[str] = []
    frames = await _stream_pending(_pending(start), StreamOptions(), closed)
    error = json.loads(frames[-2].decode().split("data: ", 1)[1])["error"]
    assert error["code"] == "internal" and error["message"] == "internal error: KeyError"
    assert frames[-1] == b"data: [DONE]\n\n" and closed == ["x"]
