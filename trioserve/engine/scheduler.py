"""The Trio side of the engine: admission, slots, per-request event channels.

Theory of operation
-------------------
``Engine.run`` is a task in the server's nursery. It starts the worker (by default the MLX
worker on one thread of its own) and, when cancelled, tells it to stop and waits for it.

A request goes through three honest steps::

    with engine.admit(request) as handle:   # queued now, or QueueFull/EngineNotReady
        await handle.start()                # waits for a slot, hands it to the worker
        async for event in handle.events(): # PrefillProgress* TokenDelta* Finished|Failed
            ...

``admit`` checks the queue bound and enqueues in one synchronous step, so a burst can never
overshoot ``max_queue``. The slot is held from ``start`` until the request's terminal event
arrives from the worker (slot lifetime = generation lifetime, however slowly the consumer
reads), or until the ``with`` block is left, for any reason, including a cancel at any
moment: ``_release`` then runs synchronously, sends the worker a ``Cancel`` if it still holds
the sequence and frees the slot. It needs no ``await``, so a cancelled scope cannot skip it.

When the worker ends for any reason, every outstanding request (queued, admitted, in the
batch, or handed over but not yet taken) fails at once with the real cause, and ``admit``
refuses new ones with that cause. The request's states are ``request_state.Lifecycle``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from trioserve.engine.events import Event, Failed, Finished, PrefillProgress, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.engine.request_state import Lifecycle, RequestState
from trioserve.engine.speculation import SpeculationConfig
from trioserve.engine.worker import (
    Cancel,
    Deliver,
    Stop,
    Submit,
    Ticket,
    Worker,
    WorkerConfig,
    WorkerSnapshot,
)

log = logging.getLogger(__name__)


class EngineNotReady(Exception):
    """The model is still loading, or the engine has stopped (the message says which)."""


class QueueFull(Exception):
    """Every slot is busy and ``max_queue`` requests are already waiting."""


class QueueTimeout(Exception):
    """A request waited longer than ``queue_timeout_s`` for a slot."""


class WorkerLike(Protocol):
    """What the engine needs of a worker: a command queue and one long-running entry point.
    ``Worker`` runs the model on its own thread; a fake worker for tests is a Trio task."""

    commands: Any  # .put(Submit | Cancel | Stop), thread-safe and never blocking

    async def run_async(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None: ...


WorkerFactory = Callable[[WorkerConfig, Callable[..., None]], WorkerLike]


@dataclass(frozen=True)
class EngineStats:
    ready: bool
    slots_total: int
    slots_busy: int
    queue_length: int
    worker: WorkerSnapshot
    context_tokens: int = 0  # the most one request holds (prompt plus output); 0: not known

    @property
    def kv_cache_usage(self) -> float:
        """How full the KV caches are, from 0 to 1: the tokens the batch's caches hold over
        the most they can hold (every slot at the context length the server admits). The
        prefix cache's entries, kept for reuse, are not counted. 0 while that is not known."""
        capacity = self.slots_total * self.context_tokens
        return min(self.worker.kv_tokens / capacity, 1.0) if capacity > 0 else 0.0


class RequestHandle:
    """One admitted request, as its consumer sees it. Made by ``Engine.admit`` only."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.request = request
        self.lifecycle = Lifecycle()
        self.prompt_processed = 0
        self.completion_tokens = 0
        self.admitted_at: float | None = None  # time.monotonic() when a slot was granted
        self.failure: str | None = None  # why the engine failed it, for the consumer
        self._engine = engine
        self._ticket = Ticket(request)
        # Unbounded, but never more than one request's events: the worker's output for it.
        self._send, self._receive = trio.open_memory_channel[Event](math.inf)
        self._wait: trio.CancelScope | None = None  # the slot wait, while in start()

    @property
    def state(self) -> RequestState:
        return self.lifecycle.state

    @property
    def phase(self) -> str:
        """The state's name, for logs and metrics labels."""
        return self.lifecycle.state.value

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    def queue_position(self) -> int | None:
        """1-based position among the requests waiting for a slot; None once admitted."""
        try:
            return self._engine._waiting.index(self) + 1
        except ValueError:
            return None

    async def start(self) -> None:
        """Wait (FIFO) for a slot, then hand the request to the worker.

        Raises ``QueueTimeout`` after ``queue_timeout_s``, ``EngineNotReady`` when the engine
        stopped meanwhile. Cancelling it leaves the queue cleanly (``_release`` does the rest).
        """
        engine = self._engine
        if self.state is RequestState.FAILED:  # the engine stopped before we even waited
            raise EngineNotReady(self.failure or "the engine stopped")
        if self.state is not RequestState.QUEUED:
            raise RuntimeError(f"start() on a request that is {self.phase}")
        timeout = engine.config.queue_timeout_s or math.inf
        acquired = False
        with trio.move_on_after(timeout) as self._wait:
            await engine._limiter.acquire_on_behalf_of(self)
            acquired = True
        self._wait = None
        if self.state is RequestState.FAILED:  # the engine stopped while we waited
            if acquired:  # the slot came just before the failure did
                engine._limiter.release_on_behalf_of(self)
            raise EngineNotReady(self.failure or "the engine stopped")
        engine._waiting.remove(self)
        if not acquired:
            self.lifecycle.advance(RequestState.FAILED)
            raise QueueTimeout(
                f"no slot became free within {engine.config.queue_timeout_s:g} s; "
                "the server is busy, retry later"
            )
        self.lifecycle.advance(RequestState.ADMITTED)
        self.admitted_at = time.monotonic()
        engine._by_ticket[self._ticket] = self
        engine._worker.commands.put(Submit(self._ticket))

    def events(self) -> _Events:
        """This request's events, ending after its ``Finished`` or ``Failed``."""
        if self.state is RequestState.QUEUED:
            raise RuntimeError("events() before start()")
        return _Events(self._receive)

    # -- called on the Trio thread by the engine -----------------------------------------

    def _on_worker_event(self, event: Event) -> None:
        if isinstance(event, PrefillProgress):
            self.prompt_processed = event.processed
            self.lifecycle.advance(RequestState.PREFILL)
        elif isinstance(event, TokenDelta):
            self.completion_tokens += 1
            self.lifecycle.advance(RequestState.DECODE)
        elif isinstance(event, Finished):
            self._end(RequestState.FINISHED)
        else:
            self.failure = event.message
            self._end(RequestState.FAILED)
        self._send.send_nowait(event)

    def _fail(self, message: str) -> None:
        """The engine stopped: fail this request now, wherever it is."""
        if self.lifecycle.ended:
            return
        self.failure = message
        if self.state is RequestState.QUEUED:
            self.lifecycle.advance(RequestState.FAILED)
            if self in self._engine._waiting:
                self._engine._waiting.remove(self)
            if self._wait is not None:
                self._wait.cancel()  # start() sees FAILED and raises EngineNotReady
            return
        self._end(RequestState.FAILED)
        self._send.send_nowait(Failed(message))

    def _end(self, state: RequestState) -> None:
        """A terminal event from the worker (or the engine's stop): the generation is over,
        so the slot goes back now, not when the consumer has read the last event."""
        held = self.lifecycle.holds_slot
        self.lifecycle.advance(state)
        self._engine._by_ticket.pop(self._ticket, None)
        if held:
            self._engine._limiter.release_on_behalf_of(self)

    def _release(self) -> None:
        """Leaving ``admit``'s block: whatever is not over yet is cancelled. Synchronous."""
        engine = self._engine
        if not self.lifecycle.ended:
            if self.lifecycle.in_worker:
                engine._worker.commands.put(Cancel(self._ticket))
            held = self.lifecycle.holds_slot
            self.lifecycle.advance(RequestState.CANCELLED)
            engine._by_ticket.pop(self._ticket, None)
            if self in engine._waiting:
                engine._waiting.remove(self)
            if held:
                engine._limiter.release_on_behalf_of(self)
        self._send.close()


class _Events:
    """A plain async iterator over one request's events (not a generator: nothing is
    suspended inside a scope when the consumer stops early)."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Event]) -> None:
        self._receive = receive
        self._done = False

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(event, Finished | Failed):
            self._done = True
        return event


@dataclass
class EngineConfig:
    """How the engine runs. ``load`` is called on the MLX thread and returns (model, tokenizer)."""

    load: Callable[[], tuple[Any, Any]]
    parallel: int = 8
    prefill_step_size: int = 64  # while other sequences decode
    solo_prefill_step_size: int = 0  # when none does; 0: the same
    max_queue: int | None = None  # waiting requests beyond the slots; None: unbounded
    queue_timeout_s: float | None = None  # longest wait for a slot; None: no limit
    prefix_cache_bytes: int = 0  # KV cache kept for prefix reuse; 0: off
    # Speculative decoding: the default drafting and its sizes (engine/speculation.py).
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # Prompt plus output tokens one request may hold (so one slot's KV cache at most): the
    # capacity ``EngineStats.kv_cache_usage`` is measured against; 0: not known.
    context_tokens: int = 0
    # OpenBLAS's thread count: "auto", a count, or None (leave it as the process started).
    blas_threads: int | str | None = None
    # The seam for tests: builds the worker from its config and the Trio scheduling call.
    worker_factory: WorkerFactory = field(default=Worker)

    def worker_config(self) -> WorkerConfig:
        """What the MLX worker is built with (on every rank alike, when distributed)."""
        return WorkerConfig(
            parallel=self.parallel,
            prefill_step_size=self.prefill_step_size,
            solo_prefill_step_size=self.solo_prefill_step_size,
            prefix_cache_bytes=self.prefix_cache_bytes,
            speculation=self.speculation,
            load=self.load,
            blas_threads=self.blas_threads,
        )


class Engine:
    """Continuous batching on one MLX thread, with Trio-native admission and cancellation."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer: Any = None
        self.ready = False
        self.failure: str | None = None  # why the engine stopped, once it has
        self._limiter = trio.CapacityLimiter(config.parallel)
        self._waiting: list[RequestHandle] = []
        self._by_ticket: dict[Ticket, RequestHandle] = {}
        self._snapshot = WorkerSnapshot()
        self._changed = trio.Event()
        self._ready_event = trio.Event()
        self._worker: WorkerLike | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker until cancelled. ``started()`` once the model is loaded.

        Raises the worker's own exception (not a group) when it fails; every outstanding
        request has been failed with that cause by then.
        """
        token = trio.lowlevel.current_trio_token()
        worker = self.config.worker_factory(self.config.worker_config(), token.run_sync_soon)
        self._worker = worker
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_worker_on_cancel, worker)
                nursery.start_soon(self._report_ready, task_status)
                try:
                    await worker.run_async(self._on_ready, self._deliver)
                except Exception as exc:
                    error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            if error is not None:
                self.failure = f"the model engine stopped: {type(error).__name__}: {error}"
            elif self.failure is None:
                self.failure = "the model engine stopped"
            self._fail_outstanding(self.failure)
        if error is not None:
            raise error

    async def _stop_worker_on_cancel(self, worker: WorkerLike) -> None:
        try:
            await trio.sleep_forever()
        finally:
            worker.commands.put(Stop())

    async def _report_ready(self, task_status: trio.TaskStatus[None]) -> None:
        await self._ready_event.wait()
        task_status.started()

    def _on_ready(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ready = True
        self._ready_event.set()
        log.info(
            "engine ready: %d slot(s), prefill step %d (%d when nothing decodes)",
            self.config.parallel,
            self.config.prefill_step_size,
            self.config.solo_prefill_step_size or self.config.prefill_step_size,
        )

    def _deliver(self, events: list[tuple[Ticket, Event]], snapshot: WorkerSnapshot) -> None:
        """Runs on the Trio thread as a ``run_sync_soon`` callback, where an exception would
        end the whole process: route the worker's events to their requests, and make one
        request's bug that request's failure."""
        for ticket, event in events:
            handle = self._by_ticket.get(ticket)
            if handle is None:  # the consumer left already, or the engine failed it
                continue
            try:
                handle._on_worker_event(event)
            except Exception as exc:
                log.exception("request %s: event %r broke its lifecycle", ticket, event)
                try:
                    handle._fail(f"internal error: {type(exc).__name__}")
                except Exception:
                    log.exception("request %s could not be failed", ticket)
        self._snapshot = snapshot
        self._changed.set()
        self._changed = trio.Event()

    def _fail_outstanding(self, message: str) -> None:
        handles = [*self._waiting, *self._by_ticket.values()]
        if handles:
            log.error("failing %d outstanding request(s): %s", len(handles), message)
        for handle in handles:
            handle._fail(message)
        self._waiting.clear()
        self._by_ticket.clear()

    def check_admission(self) -> None:
        """Raise ``EngineNotReady`` or ``QueueFull`` if a request arriving now would be
        refused. Advisory (an early 429 before any work); ``admit`` is the real bound."""
        if not self.ready:
            raise EngineNotReady(self.failure or "The model is still loading.")
        limit = self.config.max_queue
        # Waiting requests that a free slot is about to take do not count as queued.
        if limit is not None and len(self._waiting) >= limit + self._limiter.available_tokens:
            raise QueueFull(
                f"all {self.config.parallel} slots are busy and {len(self._waiting)} "
                "requests are queued"
            )

    @contextmanager
    def admit(self, request: GenerationRequest) -> Iterator[RequestHandle]:
        """Admit and enqueue ``request`` in one step (no checkpoint between the check and
        the enqueue); raises ``QueueFull``/``EngineNotReady`` instead. Leaving the block,
        however, ends the request: out of the batch, slot freed, queue left."""
        self.check_admission()
        handle = RequestHandle(self, request)
        self._waiting.append(handle)
        try:
            yield handle
        finally:
            handle._release()

    def stats(self) -> EngineStats:
        return EngineStats(
            ready=self.ready,
            slots_total=self.config.parallel,
            slots_busy=int(self._limiter.borrowed_tokens),
            queue_length=len(self._waiting),
            worker=self._snapshot,
            context_tokens=self.config.context_tokens,
        )

    def request_ids(self) -> list[str]:
        """Ids of the requests queued or holding a slot (for /debug/state)."""
        handles = [*self._waiting, *self._by_ticket.values()]
        return [handle.request.request_id for handle in handles]

    async def changed(self) -> EngineStats:
        """Wait for the next worker report; return the stats after it (tests, tools)."""
        await self._changed.wait()
        return self.stats()
