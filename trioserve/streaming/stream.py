"""One SSE stream: a nursery holding the generation task and the heartbeat tasks.

Scope tree of a streamed request::

    lifespan nursery (server) ── Engine.run ── MLX worker thread
    request handler ── response body ── sse_frames (as_safe_channel task)
                                         └─ stream nursery
                                              ├─ _generate   (engine.submit → events)
                                              ├─ _progress   (opt-in prefill progress)
                                              └─ _keepalive  (optional SSE comments)

When the client goes, Quart-Trio cancels the handler; the body's ``async with`` exits and
``as_safe_channel`` cancels the stream nursery. ``engine.submit``'s exit then drops the sequence
from the batch and frees the slot synchronously, so no cleanup await can be skipped.
All tasks write frames into one bounded channel; the body yields them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from trioserve.engine.events import Failed, Finished, PrefillProgress, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, RequestHandle
from trioserve.streaming import sse
from trioserve.streaming.chunks import ChunkBuilder, error_payload
from trioserve.streaming.progress import PROGRESS_EVENT, ProgressReporter

log = logging.getLogger(__name__)

# Frames buffered between the tasks and the client. Bounded, so a client that stops reading
# holds back generation instead of growing memory.
FRAME_BUFFER = 64


@dataclass(frozen=True)
class StreamOptions:
    progress: bool = False
    include_usage: bool = False
    logprobs: bool = False
    heartbeat_interval_s: float = 2.0
    keepalive_s: float = 0.0


@dataclass
class _State:
    """Shared by the stream's tasks (all on the Trio thread)."""

    content_started: trio.Event
    done: trio.Event
    last_sent: float


@trio.as_safe_channel
async def sse_frames(
    engine: Engine, request: GenerationRequest, builder: ChunkBuilder, options: StreamOptions
) -> AsyncIterator[bytes]:
    """The stream's SSE frames, ending with ``data: [DONE]``."""
    send, receive = trio.open_memory_channel[bytes](FRAME_BUFFER)
    state = _State(trio.Event(), trio.Event(), time.monotonic())
    async with engine.submit(request) as handle, trio.open_nursery() as nursery:
        nursery.start_soon(_generate, handle, builder, options, state, send.clone())
        if options.progress:
            nursery.start_soon(_progress, handle, builder, options, state, send.clone())
        if options.keepalive_s > 0:
            nursery.start_soon(_keepalive, options, state, send.clone())
        send.close()
        async with receive:
            async for frame in receive:
                state.last_sent = time.monotonic()
                yield frame


async def _generate(
    handle: RequestHandle,
    builder: ChunkBuilder,
    options: StreamOptions,
    state: _State,
    send: trio.MemorySendChannel[bytes],
) -> None:
    reporter = ProgressReporter(builder, handle)
    finished = False
    async with send:
        try:
            async for event in handle.events():
                if isinstance(event, PrefillProgress):
                    if options.progress and not state.content_started.is_set():
                        await send.send(_progress_frame(reporter.chunk(event.processed)))
                elif isinstance(event, TokenDelta):
                    if not state.content_started.is_set():
                        await _open_content(send, builder, reporter, options, state)
                    if event.text or options.logprobs:
                        chunk = builder.content_chunk(event.text, (event,), options.logprobs)
                        await send.send(sse.data(chunk))
                elif isinstance(event, Finished):
                    if not state.content_started.is_set():
                        await _open_content(send, builder, reporter, options, state)
                    await send.send(sse.data(builder.finish_chunk(event.reason)))
                    if options.include_usage:
                        await send.send(sse.data(builder.usage_chunk(event.usage)))
                    await send.send(sse.DONE)
                    finished = True
                    log.info(
                        "request %s done: %d prompt + %d generated tokens, finish=%s",
                        handle.request.request_id,
                        event.usage.prompt_tokens,
                        event.usage.completion_tokens,
                        event.reason,
                    )
                elif isinstance(event, Failed):
                    await _send_error(send, state, event.message)
                    finished = True
        except Exception as exc:  # after the headers, errors travel inside the stream
            log.exception("request %s failed mid-stream", handle.request.request_id)
            await _send_error(send, state, f"internal error: {type(exc).__name__}")
            finished = True
        finally:
            state.content_started.set()
            state.done.set()
            if not finished:
                log.info(
                    "request %s aborted by the client while %s, after %d generated token(s)",
                    handle.request.request_id,
                    handle.phase,
                    handle.completion_tokens,
                )


async def _open_content(
    send: trio.MemorySendChannel[bytes],
    builder: ChunkBuilder,
    reporter: ProgressReporter,
    options: StreamOptions,
    state: _State,
) -> None:
    """Close the prefill phase: a last progress event at 1.0 if opted in, then the role chunk."""
    if options.progress and reporter.last_fraction < 1.0:
        await send.send(_progress_frame(reporter.final_chunk()))
    state.content_started.set()
    await send.send(sse.data(builder.role_chunk()))


async def _send_error(send: trio.MemorySendChannel[bytes], state: _State, message: str) -> None:
    state.content_started.set()
    await send.send(sse.data(error_payload(message, "server_error", code="generation_failed")))
    await send.send(sse.DONE)


async def _progress(
    handle: RequestHandle,
    builder: ChunkBuilder,
    options: StreamOptions,
    state: _State,
    send: trio.MemorySendChannel[bytes],
) -> None:
    """Heartbeat progress while queued and during prefill; never after the first content."""
    reporter = ProgressReporter(builder, handle)
    async with send:
        while True:
            with trio.move_on_after(options.heartbeat_interval_s):
                await state.content_started.wait()
            if state.content_started.is_set():
                return
            # send_nowait: the check above and the enqueue are atomic, so no progress frame
            # can land after the first content. A full buffer just skips one heartbeat.
            try:
                send.send_nowait(_progress_frame(reporter.chunk()))
            except trio.WouldBlock:
                pass


async def _keepalive(
    options: StreamOptions, state: _State, send: trio.MemorySendChannel[bytes]
) -> None:
    """SSE comment lines while the stream is otherwise silent (off unless configured)."""
    async with send:
        while not state.done.is_set():
            wait_s = state.last_sent + options.keepalive_s - time.monotonic()
            with trio.move_on_after(max(wait_s, 0.05)):
                await state.done.wait()
            if state.done.is_set():
                return
            if time.monotonic() - state.last_sent >= options.keepalive_s:
                try:
                    send.send_nowait(sse.comment("keepalive"))
                    state.last_sent = time.monotonic()
                except trio.WouldBlock:
                    pass


def _progress_frame(chunk: dict) -> bytes:
    return sse.event(PROGRESS_EVENT, chunk)
