"""A stream whose queue filled between the handler's 429 check and its first frame."""

from __future__ import annotations

import json

import trio

from tests.engine.conftest import chat_request
from trioserve.streaming.chunks import ChunkBuilder
from trioserve.streaming.stream import StreamOptions, sse_frames


async def test_a_stream_that_finds_the_queue_full_ends_with_a_rate_limit_error(open_engine):
    async with open_engine(parallel=1, max_queue=0) as engine:
        holding = trio.Event()

        async def hold_the_slot(task_status=trio.TASK_STATUS_IGNORED):
            async with engine.submit(chat_request(engine, "Count to fifty.", 400)) as handle:
                async for _ in handle.events():
                    if not holding.is_set():
                        holding.set()
                        task_status.started()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_slot)
            builder = ChunkBuilder.new("chat", "m")
            request = chat_request(engine, "Say hi.")
            async with sse_frames(engine, request, builder, StreamOptions()) as frames:
                received = [frame async for frame in frames]
            nursery.cancel_scope.cancel()
        assert engine.stats().slots_busy == 0

    assert received[-1] == b"data: [DONE]\n\n"
    assert len(received) == 2, received
    error = json.loads(received[0].removeprefix(b"data: "))["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "queue_full"
    assert "busy" in error["message"]
