"""One SSE stream: a nursery holding the generation task and the heartbeat tasks.

Scope tree of a streamed request (docs/cancellation.md draws it whole)::

    lifespan nursery (server) ── Engine.run ── MLX worker thread
    request handler ── response body ── sse_frames (as_safe_channel task)
                                         └─ stream nursery
                                              ├─ _generate   (engine.submit → events)
                                              ├─ _progress   (opt-in prefill progress)
                                              ├─ _keepalive  (optional SSE comments)
                                              └─ _drain      (server shutdown grace)

When the client goes, Quart-Trio cancels the handler; the body's ``async with`` exits and
``as_safe_channel`` cancels the stream nursery. ``engine.submit``'s exit then drops the sequence
from the batch and frees the slot synchronously, so no cleanup await can be skipped.
All tasks write frames into one bounded channel; the body yields them in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from trioserve.engine.events import Event, Failed, Finished, PrefillProgress, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, QueueFull, QueueTimeout, RequestHandle
from trioserve.lifecycle import Drain
from trioserve.metrics import RequestObserver
from trioserve.streaming import sse
from trioserve.streaming.chunks import ChunkBuilder, error_payload
from trioserve.streaming.progress import PROGRESS_EVENT, ProgressReporter
from trioserve.streaming.shaper import ShapingSpec, make_shaper

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
    send_timeout_s: float | None = None  # None: wait for a slow reader forever
    drain: Drain | None = None
    observer: RequestObserver | None = None
    shaping: ShapingSpec | None = None  # content/reasoning/tool-call split; None: plain text


class SendTimeout(Exception):
    """The client kept the connection open but read nothing for ``send_timeout_s``."""


@dataclass
class _State:
    """Shared by the stream's tasks (all on the Trio thread)."""

    content_started: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    last_sent: float = field(default_factory=time.monotonic)
    stream: trio.CancelScope | None = None  # the stream nursery's scope


@trio.as_safe_channel
async def sse_frames(
    engine: Engine, request: GenerationRequest, builder: ChunkBuilder, options: StreamOptions
) -> AsyncIterator[bytes]:
    """The stream's SSE frames, ending with ``data: [DONE]``."""
    try:
        # Checked before the headers too; the queue may have filled since. No checkpoint
        # lies between this and submit's own check, so the two agree.
        engine.check_admission()
    except QueueFull as exc:
        yield sse.data(
            error_payload(f"The server is busy: {exc}.", "rate_limit_error", "queue_full")
        )
        yield sse.DONE
        return
    send, receive = trio.open_memory_channel[bytes](FRAME_BUFFER)
    state = _State()
    async with engine.submit(request) as handle, trio.open_nursery() as nursery:
        state.stream = nursery.cancel_scope
        writer = _Writer(handle, builder, options, state, send.clone())
        nursery.start_soon(writer.run)
        if options.progress:
            nursery.start_soon(_progress, handle, builder, options, state, send.clone())
        if options.keepalive_s > 0:
            nursery.start_soon(_keepalive, options, state, send.clone())
        send.close()
        async with receive:
            async for frame in receive:
                state.last_sent = time.monotonic()
                yield frame


class _Writer:
    """The generation task: engine events in, SSE frames out."""

    def __init__(
        self,
        handle: RequestHandle,
        builder: ChunkBuilder,
        options: StreamOptions,
        state: _State,
        send: trio.MemorySendChannel[bytes],
    ) -> None:
        self.handle = handle
        self.builder = builder
        self.options = options
        self.state = state
        self.send_channel = send
        self.reporter = ProgressReporter(builder, handle)
        self.finished = False
        self.pieces: list[str] = []  # for the debug log only
        self.shaper = make_shaper(options.shaping)

    async def run(self) -> None:
        request_id = self.handle.request.request_id
        async with self.send_channel:
            try:
                with self._drain_guard() as generation:
                    async for event in self.handle.events():
                        if self.options.observer is not None:
                            self.options.observer.on_event(event, self.handle)
                        await self._on_event(event)
                if not self.finished and generation.cancelled_caught:
                    await self._send_error("the server is shutting down", "server_shutdown")
            except QueueTimeout as exc:
                await self._send_error(str(exc), "queue_timeout", "rate_limit_error")
            except SendTimeout:
                log.info("request %s dropped: the client stopped reading", request_id)
                self._record_abort("stalled")
                # End the whole stream, the body's blocked yield included, so the slot is
                # freed now rather than whenever the client reads again.
                self.state.stream.cancel()
            except Exception as exc:  # after the headers, errors travel inside the stream
                log.exception("request %s failed mid-stream", request_id)
                await self._send_error(f"internal error: {type(exc).__name__}", "internal")
            finally:
                self.state.content_started.set()
                self.state.done.set()
                if not self.finished:
                    self._record_abort(self.handle.phase)

    def _drain_guard(self) -> contextlib.AbstractContextManager[trio.CancelScope]:
        if self.options.drain is None:
            return trio.CancelScope()
        return self.options.drain.guard()

    def _record_abort(self, phase: str) -> None:
        if self.finished:
            return
        self.finished = True  # log and count once
        log.info(
            "request %s aborted by the client while %s, after %d generated token(s)",
            self.handle.request.request_id,
            phase,
            self.handle.completion_tokens,
        )
        if self.options.observer is not None:
            self.options.observer.disconnected(phase)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, PrefillProgress):
            if self.options.progress and not self.state.content_started.is_set():
                await self._send(_progress_frame(self.reporter.chunk(event.processed)))
        elif isinstance(event, TokenDelta):
            await self._open_content()
            self.pieces.append(event.text)
            if self.shaper is not None:
                shaped = self.shaper.feed(event.text)
                for chunk in self.builder.piece_chunks(shaped, (event,), self.options.logprobs):
                    await self._send(sse.data(chunk))
            elif event.text or self.options.logprobs:
                chunk = self.builder.content_chunk(event.text, (event,), self.options.logprobs)
                await self._send(sse.data(chunk))
        elif isinstance(event, Finished):
            await self._on_finished(event)
        elif isinstance(event, Failed):
            await self._send_error(event.message, "generation_failed")

    async def _on_finished(self, event: Finished) -> None:
        await self._open_content()
        reason = event.reason
        if self.shaper is not None:  # what the shaper held back, then maybe "tool_calls"
            for chunk in self.builder.piece_chunks(self.shaper.finish()):
                await self._send(sse.data(chunk))
            reason = self.shaper.finish_reason(reason)
        await self._send(sse.data(self.builder.finish_chunk(reason)))
        if self.options.include_usage:
            await self._send(sse.data(self.builder.usage_chunk(event.usage)))
        await self._send(sse.DONE)
        self.finished = True
        request_id = self.handle.request.request_id
        usage = event.usage
        log.info(
            "request %s done: %d prompt + %d generated tokens, finish=%s",
            request_id,
            usage.prompt_tokens,
            usage.completion_tokens,
            event.reason,
        )
        # Answers can be private: only at debug level.
        log.debug("request %s (%s) text: %r", request_id, self.builder.id, "".join(self.pieces))

    async def _open_content(self) -> None:
        """Close the prefill phase once: a last progress event at 1.0, then the role chunk."""
        if self.state.content_started.is_set():
            return
        if self.options.progress and self.reporter.last_fraction < 1.0:
            await self._send(_progress_frame(self.reporter.final_chunk()))
        self.state.content_started.set()
        await self._send(sse.data(self.builder.role_chunk()))

    async def _send_error(self, message: str, code: str, error_type: str = "server_error") -> None:
        self.finished = True
        self.state.content_started.set()
        await self._send(sse.data(error_payload(message, error_type, code=code)))
        await self._send(sse.DONE)

    async def _send(self, frame: bytes) -> None:
        """Queue a frame; a client that reads nothing for ``send_timeout_s`` is dropped."""
        with trio.move_on_after(self.options.send_timeout_s or math.inf) as waited:
            await self.send_channel.send(frame)
        if waited.cancelled_caught:
            raise SendTimeout


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
