"""The served models: each its own engine, loaded on demand, unloaded by LRU and idle time.

Scope tree::

    lifespan nursery (server) ── ModelPool.run ── pool nursery
        ├─ _run_model(a): resolve → slot → Engine.run ── MLX worker thread
        ├─ _run_model(b): ...
        └─ _expire_idle (with --model-ttl)

A model's whole life (resolving it off the event loop, waiting for a slot, its engine) is one
task of the pool's nursery under a ``CancelScope`` of its own: unloading is cancelling that
scope (``Engine.run`` stops its worker thread, which drops the weights), and a shutdown
cancels them all. Requests never own a load: a client that leaves while its model loads only
stops waiting.

A request holds a ``Lease`` from picking its model until its generation (the streamed body
included) has ended; a leased model is never unloaded. ``acquire`` waits for that model's load
only, never for another's. To load a model when ``max_loaded`` are loaded, the least recently
used one without leases is unloaded first; when every loaded model is leased, the load waits
until one is free. Before that, the model's size on disk is compared with the memory the
system has free plus what the unload frees: a model that cannot fit is refused
(``InsufficientMemory``), not swapped in.

One model configured is the single-model server of old: loaded at start, never unloaded, and
``acquire`` never waits (the engine's own admission answers 503 while it loads).

Failure rule: a model whose engine fails (or that cannot be resolved or loaded) stays
``failed`` with its cause; its requests get that cause, the other models go on serving, and it
is not loaded again in-process (a fault that killed it once would likely again). A model
refused for memory is not failed: a later request tries again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from trioserve.engine.model_memory import MemoryReader, gib, mem_available
from trioserve.engine.scheduler import Engine, EngineStats

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class PoolError(Exception):
    """Why a request cannot have its model; ``code`` is the API error code."""

    code = "model_unavailable"


class UnknownModel(PoolError):
    code = "model_not_found"

    def __init__(self, asked: str | None, names: Sequence[str]) -> None:
        listed = ", ".join(repr(n) for n in names)
        what = "model is required" if asked is None else f"the model {asked!r} is not served here"
        super().__init__(f"{what}; this server serves {listed}.")
        self.asked = asked
        self.names = tuple(names)


class ModelFailed(PoolError):
    code = "model_failed"


class InsufficientMemory(PoolError):
    code = "insufficient_memory"


class PoolClosed(PoolError):
    code = "server_shutdown"


class SlotTimeout(PoolError):
    """The model waited ``--queue-timeout`` for a free slot (every loaded model leased)."""

    code = "queue_timeout"


@dataclass(frozen=True)
class ModelFacts:
    """A resolved model, as the request path needs it."""

    path: Path  # the mlx-lm directory
    context_length: int
    vocab_size: int | None = None
    weight_bytes: int = 0  # its weight files' sizes: the resident-size estimate


class _NobodyWaits(Exception):
    """A load waiting for its slot whose every waiter has gone: it is given up."""


@dataclass
class _Attempt:
    """One load of one model: requests waiting for it learn how it ended."""

    done: trio.Event = field(default_factory=trio.Event)
    error: PoolError | None = None
    waiters: int = 0  # requests waiting in ``acquire`` for this attempt
    slot_wait_since: float | None = None  # while the load waits for a free slot


@dataclass(eq=False)
class ServedModel:
    """One configured model: its name, source, state and (while loaded) its engine."""

    name: str
    source: str | Path | None
    state: ModelState = ModelState.UNLOADED
    engine: Engine | None = None
    facts: ModelFacts | None = None
    failure: str | None = None  # why it failed, once it has
    last_used: float = 0.0  # trio.current_time() of the last lease taken or returned
    leases: int = 0  # requests between picking this model and the end of their generation
    _holds_slot: bool = False  # counts against max_loaded (loaded, or loading its engine)
    _scope: trio.CancelScope | None = None
    _attempt: _Attempt = field(default_factory=_Attempt)
    _task_done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._task_done.set()  # no task yet

    @property
    def model_id(self) -> str:
        return self.name

    @property
    def tokenizer(self) -> object:
        return self.engine.tokenizer if self.engine is not None else None

    @property
    def context_length(self) -> int:
        assert self.facts is not None, "the model is not resolved yet"
        return self.facts.context_length

    @property
    def vocab_size(self) -> int | None:
        return self.facts.vocab_size if self.facts is not None else None

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None


class Lease:
    """A request's hold on a model; ``release`` is idempotent and synchronous, so the first
    of the places that call it (the body's end, the request's end) returns it exactly once."""

    def __init__(self, pool: ModelPool, served: ServedModel) -> None:
        self.served = served
        self._pool = pool
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.served)


class _Ready:
    """What ``Engine.run`` calls ``started()`` on once the model is loaded."""

    def __init__(self, pool: ModelPool, served: ServedModel, started_at: float) -> None:
        self._pool, self._served, self._started_at = pool, served, started_at

    def started(self, value: object = None) -> None:
        self._pool._on_loaded(self._served, trio.current_time() - self._started_at)


class ModelPool:
    """The configured models and the tasks that load, serve and unload them."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        build_engine: Callable[[ModelFacts], Engine],
        resolve: Callable[[str | Path | None], ModelFacts],
        max_loaded: int = 1,
        ttl_s: float = 0.0,
        queue_timeout_s: float | None = None,
        available_memory: MemoryReader = mem_available,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if not models:
            raise ValueError("a pool needs at least one model")
        self.models = list(models)
        self.max_loaded = max_loaded
        self.ttl_s = ttl_s
        self.queue_timeout_s = queue_timeout_s  # a request's longest wait for a slot
        self._by_name = {m.name: m for m in self.models}
        self._build_engine = build_engine
        self._resolve = resolve  # blocking (downloads, conversion): run in a thread
        self._available_memory = available_memory
        self._on_failure = on_failure  # single model only: `trioserve serve` then exits 1
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._changed = trio.Event()

    @property
    def several(self) -> bool:
        return len(self.models) > 1

    @property
    def default(self) -> ServedModel:
        """The first model listed: loaded at start; what ``--model-alias`` names map to."""
        return self.models[0]

    @property
    def running(self) -> bool:
        return self._nursery is not None and not self._closing

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str | None) -> ServedModel:
        """The model a request names. One model serves every name (as ever); with several,
        an unknown or missing name is ``UnknownModel``."""
        if not self.several:
            return self.default
        served = self._by_name.get(name) if name is not None else None
        if served is None:
            raise UnknownModel(name, self.names())
        return served

    # -- the pool's own task ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every model's task until cancelled; loads the first model at once."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._close_on_cancel)
            if self.several:
                self._start_load(self.default)
                if self.ttl_s > 0:
                    nursery.start_soon(self._expire_idle)
            else:
                nursery.start_soon(self._run_single, self.default)
            task_status.started()

    async def _close_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._closing = True  # waiters stop waiting instead of starting loads
            self._notify()

    # -- leases --------------------------------------------------------------------------

    async def acquire(self, served: ServedModel) -> Lease:
        """A lease on ``served``, once it is loaded (starting its load if it is unloaded).
        Raises ``ModelFailed``, ``InsufficientMemory``, ``SlotTimeout`` or ``PoolClosed``
        (also when the pool closes while it waits). Cancelled while it waits, it leaves
        nothing behind: the count goes up only on the way out."""
        since = trio.current_time()
        while self.several:
            if served.state is ModelState.FAILED:
                raise ModelFailed(self._failed_message(served))
            if served.state is ModelState.LOADED:
                break
            if not self.running:
                raise PoolClosed("The server is not serving (starting or shutting down).")
            if served.state is ModelState.UNLOADED:
                if not served._task_done.is_set():  # its last engine is still stopping
                    await served._task_done.wait()
                    continue
                self._start_load(served)
            attempt = served._attempt
            await self._wait_for(served, attempt, since)
            if attempt.error is not None:
                raise attempt.error
        served.leases += 1
        served.last_used = trio.current_time()
        return Lease(self, served)

    async def _wait_for(self, served: ServedModel, attempt: _Attempt, since: float) -> None:
        """Until ``attempt`` ends or the pool closes; at most ``queue_timeout_s`` of it while
        the load waits for a slot. Every change that matters calls ``_notify``."""
        attempt.waiters += 1
        try:
            while not attempt.done.is_set() and self.running:
                changed = self._changed
                with trio.move_on_at(self._slot_deadline(attempt, since)) as timer:
                    await changed.wait()
                if timer.cancelled_caught and attempt.slot_wait_since is not None:
                    raise SlotTimeout(
                        f"The model {served.name!r} could not load within "
                        f"{self.queue_timeout_s:g} s: every loaded model is in use "
                        f"(--max-loaded-models {self.max_loaded}); retry later."
                    )
        finally:
            attempt.waiters -= 1
            if attempt.waiters == 0 and attempt.slot_wait_since is not None:
                self._notify()  # a load waiting for its slot for nobody gives up

    def _slot_deadline(self, attempt: _Attempt, since: float) -> float:
        """When a request waiting since ``since`` stops waiting for the load's slot."""
        if attempt.slot_wait_since is None or not self.queue_timeout_s:
            return math.inf
        return max(since, attempt.slot_wait_since) + self.queue_timeout_s

    @contextlib.asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[ServedModel]:
        """``async with pool.lease(name) as served:`` for work that ends inside the block."""
        held = await self.acquire(self.get(name))
        try:
            yield held.served
        finally:
            held.release()

    def _release(self, served: ServedModel) -> None:
        served.leases -= 1
        served.last_used = trio.current_time()
        self._notify()

    # -- loading and unloading -----------------------------------------------------------

    def _start_load(self, served: ServedModel) -> None:
        assert self._nursery is not None
        served.state = ModelState.LOADING
        served._attempt = _Attempt()
        served._task_done = trio.Event()
        self._nursery.start_soon(self._run_model, served, served._attempt)

    async def _run_model(self, served: ServedModel, attempt: _Attempt) -> None:
        """One model's life: resolve, take a slot, run its engine until unloaded or failed."""
        started_at = trio.current_time()
        try:
            with trio.CancelScope() as served._scope:
                log.info("loading model %s", served.name)
                facts = served.facts or await trio.to_thread.run_sync(self._resolve, served.source)
                served.facts = facts
                await self._take_slot(served, facts, attempt)
                served.engine = self._build_engine(facts)
                await served.engine.run(task_status=_Ready(self, served, started_at))
        except InsufficientMemory as exc:
            log.warning("%s", exc)
            attempt.error = exc
        except _NobodyWaits:
            log.info("model %s: load given up, nobody waits for it any more", served.name)
        except Exception as exc:
            engine = served.engine
            served.failure = (
                engine.failure
                if engine is not None and engine.failure
                else f"cannot load the model: {type(exc).__name__}: {exc}"
            )
            served.state = ModelState.FAILED
            log.critical("model %s failed: %s", served.name, served.failure, exc_info=True)
        finally:
            if served.state is not ModelState.FAILED:
                if served.engine is not None:
                    log.info("model %s unloaded", served.name)
                served.state = ModelState.UNLOADED
            if served.state is not ModelState.FAILED:
                # Drop every reference to the engine, and so to the worker and its weights
                # (a failed engine's worker has ended and dropped them; it keeps the cause).
                served.engine = None
            served._scope = None
            served._holds_slot = False
            served._task_done.set()
            attempt.done.set()
            self._notify()

    async def _take_slot(self, served: ServedModel, facts: ModelFacts, attempt: _Attempt) -> None:
        """Make room under ``max_loaded``: unload the least recently used idle model, or wait
        while every loaded one is leased (giving up, ``_NobodyWaits``, once no request waits
        for this load). Refuses, before unloading anything, a model that cannot fit in
        memory."""
        checked = False
        said_waiting = False
        while True:
            occupied = [m for m in self.models if m._holds_slot]
            if len(occupied) < self.max_loaded:
                if not checked:
                    self._check_memory(served, facts, freed=0)
                served._holds_slot = True
                attempt.slot_wait_since = None
                return
            idle = [m for m in occupied if m.state is ModelState.LOADED and m.leases == 0]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                freed = victim.facts.weight_bytes if victim.facts else 0
                if not checked:
                    self._check_memory(served, facts, freed=freed)
                    checked = True
                self._unload(victim, f"to make room for {served.name} (least recently used)")
                await victim._task_done.wait()
                continue
            if not said_waiting:
                log.info(
                    "model %s waits to load: all %d loaded model(s) are in use "
                    "(--max-loaded-models %d); it loads when one is idle",
                    served.name,
                    len(occupied),
                    self.max_loaded,
                )
                said_waiting = True
            if attempt.waiters == 0:
                raise _NobodyWaits
            if attempt.slot_wait_since is None:
                attempt.slot_wait_since = trio.current_time()
                self._notify()  # its waiters' --queue-timeout starts now
            await self._changed.wait()

    def _check_memory(self, served: ServedModel, facts: ModelFacts, *, freed: int) -> None:
        available = self._available_memory()
        if available is None or facts.weight_bytes <= available + freed:
            return
        freeing = f" + {gib(freed)} from unloading an idle model" if freed else ""
        raise InsufficientMemory(
            f"Not enough memory to load the model {served.name!r}: it needs about "
            f"{gib(facts.weight_bytes)} (its weight files) and {gib(available)} are available"
            f"{freeing}. Load fewer models at once (--max-loaded-models), or serve a smaller "
            "dtype (--dtype float16 or quantized) or a smaller model."
        )

    def _unload(self, served: ServedModel, why: str) -> None:
        """Synchronous: no lease can be taken between the choice and the cancel."""
        log.info("unloading model %s %s", served.name, why)
        served.state = ModelState.UNLOADED
        if served._scope is not None:
            served._scope.cancel()

    def _on_loaded(self, served: ServedModel, took_s: float) -> None:
        served.state = ModelState.LOADED
        served.last_used = trio.current_time()
        served._attempt.done.set()
        log.info("model %s loaded in %.1f s", served.name, took_s)
        self._notify()

    async def _expire_idle(self) -> None:
        """Unload models nobody has used for ``ttl_s``; wakes at the next expiry or change."""
        while True:
            now = trio.current_time()
            next_at = math.inf
            for m in self.models:
                if m.state is not ModelState.LOADED or m.leases:
                    continue
                expires = m.last_used + self.ttl_s
                if expires <= now:
                    self._unload(m, f"after {self.ttl_s:g} s idle (--model-ttl)")
                else:
                    next_at = min(next_at, expires)
            changed = self._changed
            with trio.move_on_at(next_at):
                await changed.wait()

    async def _run_single(self, served: ServedModel) -> None:
        """The one model of a single-model server: its engine, prebuilt, runs until the end."""
        assert served.engine is not None
        served.state = ModelState.LOADING
        try:
            await served.engine.run(task_status=_Ready(self, served, trio.current_time()))
        except Exception:
            # Engine.run failed every outstanding request and keeps the cause in
            # engine.failure: /health and every later request show it. Never silent.
            served.state = ModelState.FAILED
            served.failure = served.engine.failure
            log.critical("%s", served.engine.failure, exc_info=True)
            if self._on_failure is not None:
                self._on_failure(served.engine.failure or "the model engine stopped")

    def _failed_message(self, served: ServedModel) -> str:
        return (
            f"The model {served.name!r} failed and is not served until the server restarts: "
            f"{served.failure}"
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


__all__ = [
    "InsufficientMemory",
    "Lease",
    "ModelFacts",
    "ModelFailed",
    "ModelPool",
    "ModelState",
    "PoolClosed",
    "PoolError",
    "ServedModel",
    "SlotTimeout",
    "UnknownModel",
]
