"""The Trio side of the engine: admission, slots, per-request event channels.

Theory of operation
-------------------
``Engine.run`` is a task in the server's nursery. It starts the MLX worker with one
``trio.to_thread.run_sync`` call and, when cancelled, tells the worker to stop and waits for it.

A request is ``async with engine.submit(request) as handle``; iterating ``handle.events()``
waits for a slot (a FIFO ``trio.CapacityLimiter``), hands the request to the worker and yields
its events. Leaving the ``async with`` block, for any reason, including a cancel at any moment
(queued, prefill, decode), runs ``_release`` synchronously: the cancel command goes to the
worker (which drops the sequence before its next step) and the slot is released. It needs no
``await``, so a cancelled scope cannot skip it and nothing needs shielding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from trioserve.engine.events import Event, Failed, Finished, PrefillProgress, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.engine.worker import (
    Cancel,
    FaultHook,
    Stop,
    Submit,
    Ticket,
    Worker,
    WorkerConfig,
    WorkerSnapshot,
)

log = logging.getLogger(__name__)

Phase = Literal["queued", "prefill", "decode", "done"]


class EngineNotReady(Exception):
    """The model is still loading, or the engine has stopped."""


class QueueFull(Exception):
    """Every slot is busy and ``max_queue`` requests are already waiting."""


class QueueTimeout(Exception):
    """A request waited longer than ``queue_timeout_s`` for a slot."""


@dataclass(frozen=True)
class EngineStats:
    ready: bool
    slots_total: int
    slots_busy: int
    queue_length: int
    worker: WorkerSnapshot


class RequestHandle:
    """One submitted request, as its consumer sees it."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.request = request
        self.phase: Phase = "queued"
        self.prompt_processed = 0
        self.completion_tokens = 0
        self._engine = engine
        self._ticket = Ticket(request)
        self._send, self._receive = trio.open_memory_channel[Event](math.inf)
        self._holds_slot = False
        self._submitted = False
        self.admitted_at: float | None = None  # time.monotonic() when a slot was granted

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    def queue_position(self) -> int | None:
        """1-based position among the requests waiting for a slot; None once admitted."""
        try:
            return self._engine._waiting.index(self) + 1
        except ValueError:
            return None

    async def events(self) -> AsyncIterator[Event]:
        """Wait for a slot, then yield this request's events up to Finished or Failed."""
        engine = self._engine
        if not engine.ready:
            raise EngineNotReady("the model is not loaded yet")
        engine._waiting.append(self)
        try:
            with trio.move_on_after(engine.config.queue_timeout_s or math.inf) as waited:
                await engine._limiter.acquire_on_behalf_of(self)
        finally:
            engine._waiting.remove(self)
        if waited.cancelled_caught:
            raise QueueTimeout(
                f"no slot became free within {engine.config.queue_timeout_s:g} s; "
                "the server is busy, retry later"
            )
        self._holds_slot = True
        self.admitted_at = time.monotonic()
        self.phase = "prefill"
        engine._by_ticket[self._ticket] = self
        engine._worker.commands.put(Submit(self._ticket))
        self._submitted = True
        async for event in self._receive:
            self._observe(event)
            yield event
            if isinstance(event, Finished | Failed):
                return

    def _observe(self, event: Event) -> None:
        if isinstance(event, PrefillProgress):
            self.prompt_processed = event.processed
        elif isinstance(event, TokenDelta):
            self.phase = "decode"
            self.completion_tokens += 1
        else:
            self.phase = "done"

    def _release(self) -> None:
        engine = self._engine
        if self._submitted and self.phase != "done":
            engine._worker.commands.put(Cancel(self._ticket))
        engine._by_ticket.pop(self._ticket, None)
        if self._holds_slot:
            self._holds_slot = False
            engine._limiter.release_on_behalf_of(self)
        self._send.close()


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
    fault_hook: FaultHook | None = None


class Engine:
    """Continuous batching on one MLX thread, with Trio-native admission and cancellation."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer: Any = None
        self.ready = False
        self._limiter = trio.CapacityLimiter(config.parallel)
        self._waiting: list[RequestHandle] = []
        self._by_ticket: dict[Ticket, RequestHandle] = {}
        self._snapshot = WorkerSnapshot()
        self._changed = trio.Event()
        self._ready_event = trio.Event()
        self._worker: Worker | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the MLX worker thread until cancelled. ``started()`` once the model is loaded."""
        token = trio.lowlevel.current_trio_token()
        self._worker = Worker(
            WorkerConfig(
                parallel=self.config.parallel,
                prefill_step_size=self.config.prefill_step_size,
                solo_prefill_step_size=self.config.solo_prefill_step_size,
                fault_hook=self.config.fault_hook,
                prefix_cache_bytes=self.config.prefix_cache_bytes,
                load=self.config.load,
            ),
            schedule=token.run_sync_soon,
        )
        worker = self._worker
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_worker_on_cancel, worker)
            nursery.start_soon(self._report_ready, task_status)
            try:
                # One thread for the worker's whole life; its own limiter so other
                # to_thread users can never keep it from starting.
                await trio.to_thread.run_sync(
                    worker.run,
                    self._on_ready,
                    self._deliver,
                    limiter=trio.CapacityLimiter(1),
                )
            finally:
                self.ready = False
                nursery.cancel_scope.cancel()

    async def _stop_worker_on_cancel(self, worker: Worker) -> None:
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
        """Runs on the Trio thread: route the worker's events to their requests."""
        for ticket, event in events:
            handle = self._by_ticket.get(ticket)
            if handle is not None:  # None: the consumer left already
                handle._send.send_nowait(event)
        self._snapshot = snapshot
        self._changed.set()
        self._changed = trio.Event()

    def check_admission(self) -> None:
        """Raise ``QueueFull`` when a new request would wait behind ``max_queue`` others."""
        limit = self.config.max_queue
        if limit is None or self._limiter.available_tokens > 0:
            return
        if len(self._waiting) >= limit:
            raise QueueFull(
                f"all {self.config.parallel} slots are busy and {len(self._waiting)} "
                "requests are queued"
            )

    @asynccontextmanager
    async def submit(self, request: GenerationRequest) -> AsyncIterator[RequestHandle]:
        """Reserve nothing yet; iterate ``handle.events()`` to queue and generate.

        Whatever way the block is left, the sequence leaves the batch and the slot is freed.
        Raises ``QueueFull`` at once when the queue is at ``max_queue``.
        """
        self.check_admission()
        handle = RequestHandle(self, request)
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
        )

    def request_ids(self) -> list[str]:
        """Ids of the requests queued or holding a slot (for /debug/state)."""
        handles = [*self._waiting, *self._by_ticket.values()]
        return [handle.request.request_id for handle in handles]

    async def wait_until(self, predicate: Callable[[EngineStats], bool]) -> EngineStats:
        """Wait until ``predicate(stats)`` holds; re-checked after every worker step."""
        while not predicate(stats := self.stats()):
            await self._changed.wait()
        return stats
