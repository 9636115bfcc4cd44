"""The model pool with real engines on the fake worker: loading on demand, LRU eviction,
leases that block it, idle expiry (under a MockClock), the memory refusal with an injected
reader, failed models, and waits that never depend on another model's load."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from trioserve.api.errors import RateLimited, ServiceUnavailable
from trioserve.api.models import as_api_error, wait_for_lease
from trioserve.drain import Drain
from trioserve.engine.events import Failed, Finished
from trioserve.engine.model_memory import GIB, mem_available
from trioserve.engine.params import GenerationRequest
from trioserve.engine.pool import (
    InsufficientMemory,
    ModelFacts,
    ModelFailed,
    ModelPool,
    ModelState,
    PoolClosed,
    ServedModel,
    SlotTimeout,
    UnknownModel,
)
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.testing.fake_worker import FakeWorker

LOADED, LOADING, UNLOADED, FAILED = (
    ModelState.LOADED,
    ModelState.LOADING,
    ModelState.UNLOADED,
    ModelState.FAILED,
)


class Models:
    """A pool over fake models: ``resolve`` and ``build_engine`` record what they did."""

    def __init__(
        self,
        names: tuple[str, ...] = ("a", "b", "c"),
        *,
        sizes: dict[str, int] | None = None,
        memory: int | None = None,
        broken: tuple[str, ...] = (),
        **options,
    ) -> None:
        self.sizes = sizes or {}
        self.memory = memory
        self.broken = broken
        self.resolved: list[str] = []
        self.gates: dict[str, threading.Event] = {}  # a resolve waits for its gate
        self.workers: dict[str, list[FakeWorker]] = {}
        self.served = [ServedModel(name, name) for name in names]
        self.pool = ModelPool(
            self.served,
            build_engine=self.build_engine,
            resolve=self.resolve,
            available_memory=lambda: self.memory,
            **options,
        )

    def __getitem__(self, name: str) -> ServedModel:
        return self.pool.get(name)

    def resolve(self, source) -> ModelFacts:  # on a worker thread, like the real one
        self.resolved.append(source)
        gate = self.gates.get(source)
        if gate is not None:
            assert gate.wait(10), "the test never opened the gate"
        if source in self.broken:
            raise FileNotFoundError(f"no model {source}")
        return ModelFacts(Path("/models", source), 2048, None, self.sizes.get(source, GIB))

    def build_engine(self, facts: ModelFacts) -> Engine:
        factory = FakeWorker.factory(step_s=0.01)
        self.workers.setdefault(facts.path.name, factory.created)  # type: ignore[attr-defined]
        config = EngineConfig(load=lambda: (None, None), parallel=2, worker_factory=factory)
        return Engine(config)


async def until(condition, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 (states of several objects, polled)
            await trio.sleep(0.005)


async def use(pool: ModelPool, name: str) -> object:
    """One short generation on ``name`` under a lease; returns its last event."""
    async with pool.lease(name) as served:
        request = GenerationRequest(prompt_tokens=(1, 2, 3), max_tokens=2, request_id=name)
        with served.engine.admit(request) as handle:
            await handle.start()
            events = [event async for event in handle.events()]
    return events[-1]


async def test_the_first_model_loads_at_start_and_the_others_on_demand(nursery):
    models = Models(max_loaded=3)
    await nursery.start(models.pool.run)
    await until(lambda: models["a"].state is LOADED)
    assert models["b"].state is UNLOADED and models["c"].state is UNLOADED
    assert isinstance(await use(models.pool, "b"), Finished)
    assert [m.state for m in models.served] == [LOADED, LOADED, UNLOADED]
    assert models.resolved == ["a", "b"]
    assert all(m.leases == 0 for m in models.served)


async def test_the_least_recently_used_idle_model_makes_room(nursery):
    models = Models(max_loaded=2)
    await nursery.start(models.pool.run)
    await until(lambda: models["a"].state is LOADED)
    await use(models.pool, "b")
    await use(models.pool, "a")  # now b is the least recently used
    await use(models.pool, "c")
    assert [m.state for m in models.served] == [LOADED, UNLOADED, LOADED]
    assert models["b"].engine is None  # every reference to its engine is dropped
    assert all(m.leases == 0 for m in models.served)
    # Unloaded again on demand: b comes back in place of a, now the least recent.
    await use(models.pool, "b")
    assert [m.state for m in models.served] == [UNLOADED, LOADED, LOADED]
    assert models.resolved == ["a", "b", "c"]  # resolved once each, facts kept


async def test_a_leased_model_is_never_unloaded_and_the_load_waits_for_it(nursery):
    models = Models(max_loaded=1)
    await nursery.start(models.pool.run)
    held = await models.pool.acquire(models["a"])
    nursery.start_soon(use, models.pool, "b")
    await until(lambda: models["b"].state is LOADING)
    await trio.sleep(0.2)
    assert models["a"].state is LOADED and models["b"].state is LOADING  # waiting for a slot
    assert models.resolved == ["a", "b"]
    held.release()
    held.release()  # idempotent: returned once
    await until(lambda: models["a"].state is UNLOADED and models["b"].state is LOADED)
    await until(lambda: models["b"].leases == 0)
    assert models["a"].leases == 0 and models["a"].engine is None


async def test_a_loaded_model_never_waits_on_another_models_load(nursery):
    models = Models(max_loaded=2)
    models.gates["b"] = threading.Event()
    await nursery.start(models.pool.run)
    await until(lambda: models["a"].state is LOADED)
    nursery.start_soon(use, models.pool, "b")
    await until(lambda: "b" in models.resolved)
    with trio.fail_after(5):
        await use(models.pool, "a")  # answered while b is still resolving
    assert models["b"].state is LOADING
    models.gates["b"].set()
    await until(lambda: models["b"].state is LOADED)


async def test_a_waiter_cancelled_during_the_load_leaves_no_lease(nursery):
    models = Models(max_loaded=2)
    models.gates["b"] = threading.Event()
    await nursery.start(models.pool.run)
    with trio.move_on_after(0.2):  # a client that hangs up while its model loads
        await models.pool.acquire(models["b"])
    assert models["b"].leases == 0 and models["b"].state is LOADING
    models.gates["b"].set()  # the load is the pool's: it completes all the same
    await until(lambda: models["b"].state is LOADED)
    assert all(m.leases == 0 for m in models.served)
    await use(models.pool, "b")


async def test_an_idle_model_is_unloaded_after_the_ttl(nursery, autojump_clock):
    models = Models(("a", "b"), max_loaded=2, ttl_s=10.0)
    await nursery.start(models.pool.run)
    await until(lambda: models["a"].state is LOADED)
    await trio.sleep(5)
    await use(models.pool, "a")  # used: its idle time starts again
    await trio.sleep(8)
    assert models["a"].state is LOADED
    await trio.sleep(3)
    assert models["a"].state is UNLOADED
    held = await models.pool.acquire(models["b"])  # a lease keeps it, however long
    await trio.sleep(60)
    assert models["b"].state is LOADED
    held.release()
    await trio.sleep(11)
    assert models["b"].state is UNLOADED


async def test_a_model_that_cannot_fit_is_refused_before_anything_is_unloaded(nursery):
    models = Models(("a", "b"), max_loaded=1, sizes={"a": 2 * GIB, "b": 8 * GIB})
    models.memory = 3 * GIB
    await nursery.start(models.pool.run)
    await until(lambda: models["a"].state is LOADED)
    with pytest.raises(InsufficientMemory) as refused:
        await models.pool.acquire(models["b"])
    message = str(refused.value)
    assert "'b'" in message and "8.00 GiB" in message and "3.00 GiB" in message
    assert "2.00 GiB from unloading" in message  # what evicting a would free, counted
    assert "--max-loaded-models" in message and "--dtype" in message
    assert refused.value.code == "insufficient_memory"
    assert models["a"].state is LOADED  # nothing unloaded for a load that cannot happen
    assert models["b"].state is UNLOADED and models["b"].failure is None  # not failed
    # Memory freed elsewhere: the next request tries again, and a makes room for b.
    models.memory = 7 * GIB
    await use(models.pool, "b")
    assert (models["a"].state, models["b"].state) == (UNLOADED, LOADED)


async def test_a_failed_model_stays_failed_and_the_others_serve(nursery):
    models = Models(("a", "b"), max_loaded=2, broken=("b",))
    await nursery.start(models.pool.run)
    for _ in range(2):
        with pytest.raises(ModelFailed, match="no model b"):
            await models.pool.acquire(models["b"])
    assert sorted(models.resolved) == ["a", "b"]  # b not tried again
    assert models["b"].state is FAILED and "FileNotFoundError" in models["b"].failure
    await use(models.pool, "a")


async def test_an_engine_that_dies_fails_its_model_only(nursery):
    failures: list[str] = []
    models = Models(("a", "b"), max_loaded=2, on_failure=failures.append)
    await nursery.start(models.pool.run)
    await use(models.pool, "b")
    models.workers["b"][0].crash()
    assert isinstance(await use(models.pool, "b"), Failed)
    await until(lambda: models["b"].state is FAILED)
    assert "FakeCrash" in models["b"].failure
    with pytest.raises(ModelFailed, match="until the server restarts"):
        await models.pool.acquire(models["b"])
    await use(models.pool, "a")
    assert failures == []  # only a single-model server exits on a failure


async def test_an_unknown_or_missing_name_lists_the_served_ones():
    models = Models(("a", "b"))
    with pytest.raises(UnknownModel, match="'zz' is not served here; this server serves 'a', 'b'"):
        models.pool.get("zz")
    with pytest.raises(UnknownModel, match="model is required"):
        models.pool.get(None)


async def test_one_model_serves_every_name_and_never_waits(nursery):
    models = Models(("only",))
    only = models["only"]
    only.engine = models.build_engine(ModelFacts(Path("/models/only"), 2048))
    assert models.pool.get("anything") is only and models.pool.get(None) is only
    held = await models.pool.acquire(only)  # before the pool even runs: no wait, no load
    held.release()
    await nursery.start(models.pool.run)
    await until(lambda: only.state is LOADED)
    await use(models.pool, "whatever")
    assert models.resolved == []


async def test_a_wait_for_a_slot_times_out_and_a_load_nobody_waits_for_is_given_up(
    nursery, autojump_clock
):
    models = Models(("a", "b"), max_loaded=1, queue_timeout_s=30.0)
    await nursery.start(models.pool.run)
    held = await models.pool.acquire(models["a"])  # the one slot, leased
    started = trio.current_time()
    with pytest.raises(SlotTimeout, match="within 30 s") as timed_out:
        await models.pool.acquire(models["b"])
    assert trio.current_time() - started >= 30
    error = as_api_error(timed_out.value)  # what a queue timeout answers
    assert isinstance(error, RateLimited) and error.code == "queue_timeout"
    await until(lambda: models["b"].state is UNLOADED)  # its only waiter left: given up
    assert models["b"].leases == 0 and models["b"].failure is None
    held.release()
    await trio.sleep(60)
    assert (models["a"].state, models["b"].state) == (LOADED, UNLOADED)  # a not evicted
    await use(models.pool, "b")  # a later request loads it


async def test_each_waiter_gets_its_own_slot_timeout_and_the_load_goes_on(nursery, autojump_clock):
    models = Models(("a", "b"), max_loaded=1, queue_timeout_s=30.0)
    await nursery.start(models.pool.run)
    held = await models.pool.acquire(models["a"])
    outcomes: list[object] = []

    async def wait_b() -> None:
        try:
            lease = await models.pool.acquire(models["b"])
        except SlotTimeout as exc:
            outcomes.append(exc)
        else:
            outcomes.append(lease)
            lease.release()

    nursery.start_soon(wait_b)
    await trio.sleep(20)
    nursery.start_soon(wait_b)  # 20 s later: its own 30 s
    await until(lambda: outcomes, timeout_s=60)
    assert isinstance(outcomes[0], SlotTimeout)
    assert trio.current_time() < 50  # the first one's 30 s, not the second one's
    assert models["b"].state is LOADING  # somebody still waits: the load stays
    await trio.sleep(5)
    held.release()  # at 35 s: the second waiter gets b
    await until(lambda: len(outcomes) == 2)
    assert not isinstance(outcomes[1], SlotTimeout)
    await until(lambda: models["b"].state is LOADED and models["b"].leases == 0)


async def test_waiters_are_woken_when_the_pool_closes(nursery):
    models = Models(max_loaded=2)
    models.gates["b"] = threading.Event()
    closing = trio.CancelScope()

    async def run_pool(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with closing:
            await models.pool.run(task_status=task_status)

    await nursery.start(run_pool)
    await until(lambda: models["a"].state is LOADED)
    outcomes: list[BaseException] = []

    async def wait_b() -> None:
        with pytest.raises(PoolClosed) as closed:
            await models.pool.acquire(models["b"])
        outcomes.append(closed.value)

    nursery.start_soon(wait_b)
    await until(lambda: "b" in models.resolved)  # its load is held in its resolve thread
    closing.cancel()
    await until(lambda: bool(outcomes))  # woken at once, not when that thread ends
    assert models["b"].leases == 0
    models.gates["b"].set()


async def test_the_drains_expiry_ends_a_wait_for_a_load(nursery):
    models = Models(max_loaded=2)
    models.gates["b"] = threading.Event()
    await nursery.start(models.pool.run)
    drain = Drain(grace_s=1.0)
    state = SimpleNamespace(drain=drain, models=models.pool)
    outcomes: list[BaseException] = []

    async def wait_b() -> None:
        with pytest.raises(ServiceUnavailable) as refused:
            await wait_for_lease(state, models["b"])
        outcomes.append(refused.value)

    nursery.start_soon(wait_b)
    await until(lambda: "b" in models.resolved)
    drain.begin()
    await trio.sleep(0.1)
    assert not outcomes  # like a queued request: it waits through the grace period
    drain.expire()
    await until(lambda: bool(outcomes))
    assert outcomes[0].code == "server_shutdown"
    assert models["b"].leases == 0
    models.gates["b"].set()  # the load was the pool's: it completes all the same
    await until(lambda: models["b"].state is LOADED)


def test_mem_available_reads_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1048576 kB\n")
    assert mem_available(str(meminfo)) == GIB
    assert mem_available(str(tmp_path / "absent")) is None
