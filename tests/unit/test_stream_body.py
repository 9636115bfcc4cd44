"""The SSE body's side tasks on the fake worker under MockClock: heartbeats and keepalives."""

from __future__ import annotations

import json

import trio

from trioserve.api.dialects.chat import ChunkRenderer
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.output.assembler import Assembler
from trioserve.output.chunks import ChunkBuilder
from trioserve.streaming.stream import SSEBody, StreamOptions
from trioserve.testing.fake_worker import FakeWorker


def _request(request_id: str, prompt: int = 40, max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(tuple(range(1, prompt + 1)), max_tokens, request_id=request_id)


async def _stream(engine: Engine, request: GenerationRequest, options: StreamOptions, **kw):
    assembler = Assembler(_renderer(), **kw)
    async with SSEBody(engine, request, assembler, options) as body:
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
