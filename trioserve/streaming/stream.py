"""One SSE stream: a Quart response body that owns the stream's nursery in Quart's own frame.

Scope tree of a streamed request (docs/cancellation.md draws it whole)::

    lifespan nursery (server) ── Engine.run ── MLX worker thread
    request handler ─ Quart's `async with response.response` ─ SSEBody
                        └─ stream nursery (entered in __aenter__, left in __aexit__)
                             ├─ _Writer.run   ([Pending.start: lease → prepare]; then
                             │                 run_generation: admit → slot → events → frames)
                             ├─ _loading_heartbeat (while a Pending start waits for its model)
                             ├─ _heartbeat    (opt-in prefill progress, while queued/prefill)
                             └─ _keepalive    (optional SSE comments)

Quart enters the body with ``async with``, iterates it (each ``__anext__`` is one ``receive``
on the frame channel, not a generator suspended inside a scope) and leaves it. When the
client goes, Quart-Trio cancels the handler; ``__aexit__`` cancels the stream nursery, and the
writer leaving ``engine.admit``'s block frees the slot synchronously. The slot is freed as
soon as generation ends, even if the client has not read the last frames yet, and a client
that reads nothing for ``send_timeout_s`` while frames wait is dropped (``SendTimeout``).
``on_close`` (the model's lease, ``api.models``) runs last on the way out, once the stream
nursery is done: the model cannot be unloaded under a stream.

A stream whose model is still loading starts from a ``Pending``: the headers go out at once
and its ``start`` step (the lease, then ``prepare``) runs first in the writer, in the same
nursery, so a disconnect cancels it like any other part of the stream; heartbeats (loading
progress when asked for) keep the client from timing out meanwhile. A ``StartFailed`` then
ends the stream with the dialect's error frames: the headers are out, so no HTTP error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import trio
from quart.wrappers.response import ResponseBody

from trioserve.drain import Drain
from trioserve.engine.events import Event
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, RequestHandle
from trioserve.metrics import RequestObserver
from trioserve.output import sse
from trioserve.output.assembler import Assembler
from trioserve.output.progress import LoadingReporter, ProgressReporter
from trioserve.streaming.session import ConsumerGone, run_generation

log = logging.getLogger(__name__)

# Frames buffered between the tasks and the client. Bounded, so a client that stops reading
# holds back generation instead of growing memory.
FRAME_BUFFER = 64


@dataclass(frozen=True)
class StreamOptions:
    heartbeat_interval_s: float = 2.0
    keepalive_s: float = 0.0
    send_timeout_s: float | None = None  # None: wait for a slow reader forever
    drain: Drain | None = None
    observer: RequestObserver | None = None


@dataclass(frozen=True)
class Generation:
    """What a stream generates: the engine and the prepared request."""

    engine: Engine
    request: GenerationRequest


@dataclass(frozen=True)
class Pending:
    """A generation still to be made inside the stream: ``start`` waits for ``model`` to
    load, leases and prepares it; it raises ``StartFailed`` when it cannot."""

    model: str
    start: Callable[[], Awaitable[Generation]]


class StartFailed(Exception):
    """Why a ``Pending`` start made no generation, as the stream's error frames say it."""

    def __init__(self, message: str, code: str, error_type: str = "server_error") -> None:
        super().__init__(message)
        self.message, self.code, self.error_type = message, code, error_type


class SendTimeout(ConsumerGone):
    """The client kept the connection open but read nothing for ``send_timeout_s``."""


@dataclass
class _State:
    """Shared by the stream's tasks (all on the Trio thread)."""

    done: trio.Event = field(default_factory=trio.Event)
    last_sent: float = field(default_factory=trio.current_time)


class SSEBody(ResponseBody):
    """The stream's frames, ending with ``data: [DONE]``, for ``Response(SSEBody(...))``."""

    def __init__(
        self,
        source: Generation | Pending,
        assembler: Assembler,
        options: StreamOptions,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._assembler = assembler
        self._options = options
        self._stack = contextlib.AsyncExitStack()
        if on_close is not None:  # e.g. the model's lease: runs last, once the nursery is done
            self._stack.callback(on_close)
        self._receive: trio.MemoryReceiveChannel[bytes] | None = None
        self._state = _State()

    async def __aenter__(self) -> SSEBody:
        send, receive = trio.open_memory_channel[bytes](FRAME_BUFFER)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)  # runs first on the way out
        self._receive = receive
        writer = _Writer(self._source, self._assembler, self._options, send)
        nursery.start_soon(writer.run, nursery, self._state)
        if self._options.keepalive_s > 0:
            nursery.start_soon(_keepalive, self._options, self._state, send.clone())
        return self

    def __aiter__(self) -> SSEBody:
        return self

    async def __anext__(self) -> bytes:
        assert self._receive is not None, "iterate the body inside `async with`"
        try:
            frame = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._state.last_sent = trio.current_time()
        return frame

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._receive is not None:
            self._receive.close()
        return await self._stack.__aexit__(exc_type, exc_value, tb)


class _Writer:
    """The generation task: engine events in, SSE frames out."""

    def __init__(
        self,
        source: Generation | Pending,
        assembler: Assembler,
        options: StreamOptions,
        send: trio.MemorySendChannel[bytes],
    ) -> None:
        self.source = source
        self.assembler = assembler
        self.options = options
        self.send_channel = send

    async def run(self, nursery: trio.Nursery, state: _State) -> None:
        try:
            async with self.send_channel:
                generation = await self._generation(nursery)
                if generation is not None:
                    await self._generate(generation, nursery, state)
        except ConsumerGone:
            # End the whole stream, the body's blocked receive included; the slot was freed
            # when run_generation left engine.admit's block.
            nursery.cancel_scope.cancel()
        finally:
            state.done.set()

    async def _generation(self, nursery: trio.Nursery) -> Generation | None:
        """The generation to run: given, or made by the pending start (None: it failed and
        the error frames are sent)."""
        if isinstance(self.source, Generation):
            await self._send_all(self.assembler.opening(len(self.source.request.prompt_tokens)))
            return self.source
        await self._send_all(self.assembler.opening(None))  # what needs no prompt goes now
        loading = trio.CancelScope()  # the heartbeat's: cancelled when the start is over
        reporter = LoadingReporter(self.source.model)
        heartbeat = (self.assembler, reporter, self.options, loading, self.send_channel.clone())
        nursery.start_soon(_loading_heartbeat, *heartbeat)
        try:
            generation = await self.source.start()
        except Exception as exc:  # after the headers, errors travel in the stream
            loading.cancel()  # before the error frames
            failed = exc if isinstance(exc, StartFailed) else _internal(exc, self.source.model)
            await self._send_all(
                self.assembler.error_frames(failed.message, failed.code, failed.error_type)
            )
            return None
        finally:
            loading.cancel()
        await self._send_all(self.assembler.opening(len(generation.request.prompt_tokens)))
        return generation

    async def _generate(self, generation: Generation, nursery: trio.Nursery, state: _State) -> None:
        request_id = generation.request.request_id
        try:
            ending = await run_generation(
                generation.engine,
                generation.request,
                self._on_event,
                drain=self.options.drain,
                observer=self.options.observer,
                on_admitted=lambda handle: self._admitted(handle, nursery, state),
            )
        except Exception as exc:  # after the headers, errors travel in the stream
            if isinstance(exc, ConsumerGone):
                raise
            log.exception("request %s failed mid-stream", request_id)
            await self._send_all(
                self.assembler.error_frames(f"internal error: {type(exc).__name__}", "internal")
            )
            return
        if ending.finished is None:
            error_type = "rate_limit_error" if ending.kind == "busy" else "server_error"
            await self._send_all(
                self.assembler.error_frames(ending.message, ending.code, error_type)
            )
        else:
            # Answers can be private: only at debug level.
            log.debug(
                "request %s (%s) text: %r",
                request_id,
                self.assembler.renderer.response_id,
                self.assembler.text,
            )

    def _admitted(self, handle: RequestHandle, nursery: trio.Nursery, state: _State) -> None:
        self.assembler.reporter = ProgressReporter(handle)
        if self.assembler.wants_heartbeat:
            nursery.start_soon(
                _heartbeat, self.assembler, self.options, state, self.send_channel.clone()
            )

    async def _on_event(self, event: Event) -> None:
        await self._send_all(self.assembler.frames(event))

    async def _send_all(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self._send(frame)

    async def _send(self, frame: bytes) -> None:
        """Queue a frame; a client that reads nothing for ``send_timeout_s`` is dropped."""
        with trio.move_on_after(self.options.send_timeout_s or math.inf) as waited:
            await self.send_channel.send(frame)
        if waited.cancelled_caught:
            raise SendTimeout


async def _heartbeat(
    assembler: Assembler,
    options: StreamOptions,
    state: _State,
    send: trio.MemorySendChannel[bytes],
) -> None:
    """Progress while queued and during prefill; never after the first content."""
    async with send:
        while not state.done.is_set():
            with trio.move_on_after(options.heartbeat_interval_s):
                await state.done.wait()
            # The check and the enqueue are atomic (send_nowait, no checkpoint between), so
            # no progress frame can land after the first content. A full buffer skips one.
            frame = assembler.heartbeat_frame()
            if frame is None or state.done.is_set():
                return
            try:
                send.send_nowait(frame)
            except trio.WouldBlock:
                pass


def _internal(exc: Exception, model: str) -> StartFailed:
    log.error("a stream's start on %s failed", model, exc_info=exc)
    return StartFailed(f"internal error: {type(exc).__name__}", "internal")


async def _loading_heartbeat(
    assembler: Assembler,
    reporter: LoadingReporter,
    options: StreamOptions,
    scope: trio.CancelScope,
    send: trio.MemorySendChannel[bytes],
) -> None:
    """While the model loads: a frame every heartbeat interval, so that clients with a read
    timeout keep waiting. Ends when the writer cancels ``scope`` (its start is over), inside
    which it runs, so no loading frame can follow the generation's first frame."""
    async with send:
        with scope:
            while True:
                await trio.sleep(options.heartbeat_interval_s)
                if scope.cancel_called:  # woken just as the start ended: nothing more
                    return
                try:
                    send.send_nowait(assembler.loading_frame(reporter.fields()))
                except trio.WouldBlock:
                    pass


async def _keepalive(
    options: StreamOptions, state: _State, send: trio.MemorySendChannel[bytes]
) -> None:
    """SSE comment lines while the stream is otherwise silent (off unless configured)."""
    async with send:
        while not state.done.is_set():
            wait_s = state.last_sent + options.keepalive_s - trio.current_time()
            with trio.move_on_after(max(wait_s, 0.05)):
                await state.done.wait()
            if state.done.is_set():
                return
            if trio.current_time() - state.last_sent >= options.keepalive_s:
                try:
                    send.send_nowait(sse.comment("keepalive"))
                    state.last_sent = trio.current_time()
                except trio.WouldBlock:
                    pass
