"""A stream whose queue filled between the handler's 429 check and its first frame."""

from __future__ import annotations

import json

import trio

from tests.engine.conftest import chat_request, wait_for
from trioserve.api.dialects.chat import ChunkRenderer
from trioserve.output.assembler import Assembler
from trioserve.output.chunks import ChunkBuilder
from trioserve.streaming.stream import Generation, SSEBody, StreamOptions


async def test_a_stream_that_finds_the_queue_full_ends_with_a_rate_limit_error(open_engine):
    async with open_engine(parallel=1, max_queue=0) as engine:

        async def hold_the_slot(task_status=trio.TASK_STATUS_IGNORED):
            with engine.admit(chat_request(engine, "Count to fifty.", 400)) as handle:
                await handle.start()
                task_status.started()
                async for _ in handle.events():
                    pass

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_slot)
            assembler = Assembler(_renderer())
            request = chat_request(engine, "Say hi.")
            with trio.fail_after(30):
                async with SSEBody(Generation(engine, request), assembler, StreamOptions()) as body:
                    received = [frame async for frame in body]
            nursery.cancel_scope.cancel()
        stats = await wait_for(engine, lambda s: s.worker.in_batch == 0)
        assert stats.slots_busy == 0

    assert received[-1] == b"data: [DONE]\n\n"
    assert len(received) == 2, received
    error = json.loads(received[0].removeprefix(b"data: "))["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "queue_full"
    assert "busy" in error["message"]


def _renderer() -> ChunkRenderer:
    return ChunkRenderer(ChunkBuilder.new("chat", "m"), logprobs=False, include_usage=False)
