"""Rank 0's MLX worker: the ordinary worker, plus a round broadcast before every step."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import trio

from trioserve.engine.distributed.group import RankGroup, RanksLost, batch_stream
from trioserve.engine.distributed.rounds import STEP, STOP, Insert, Op, Remove, encode, portable
from trioserve.engine.distributed.rounds import digest as step_digest
from trioserve.engine.params import GenerationRequest
from trioserve.engine.worker import Deliver, Worker, WorkerConfig, _describe

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle rank 0 sends an empty round this often
WATCH_TICK_S = 0.25
# While draining, the other ranks get no longer than this: when one dies, mlx.launch sends
# SIGTERM to all the others, rank 0 included, often before rank 0's collective has failed;
# the stuck streams must end with the rank group's error before the grace period ends them
# with a shutdown one.
DRAINING_RANK_TIMEOUT_S = 5.0


class RanksStalled(RanksLost):
    """The other ranks did not answer within the rank timeout."""


class LeaderWorker(Worker):
    """Serves the API's requests like ``Worker``, and keeps the other ranks in step."""

    def __init__(
        self,
        config: WorkerConfig,
        schedule: Callable[..., None],
        group: RankGroup,
        rank_timeout_s: float,
        drain: Any = None,
    ) -> None:
        super().__init__(config, schedule)
        self._drain = drain  # trioserve.drain.Drain: its ``draining`` shortens the timeout
        self._group = group
        self._rank_timeout_s = rank_timeout_s
        self._idle_tick_s = HEARTBEAT_S
        self._ops: list[Op] = []
        self._digest = 0
        # Read by the watchdog on the Trio thread: when the worker last made progress while
        # it needs the other ranks; None while it waits for commands (nobody else involved).
        self._busy_since: float | None = None

    async def run_async(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None:
        """Run the worker thread beside a watchdog. The thread is waited for on a normal stop
        (it tells the other ranks to end); it is left behind only when it is stuck inside a
        collective, where nothing can interrupt it."""
        ended = trio.Event()
        token = trio.lowlevel.current_trio_token()
        stalled: list[str] = []

        def run() -> None:
            try:
                self.run(on_ready, deliver)
            finally:
                token.run_sync_soon(ended.set)

        failure: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, nursery.cancel_scope, stalled)
            try:
                await trio.to_thread.run_sync(
                    run, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True
                )
            except trio.Cancelled:
                if not stalled:
                    # A normal stop: Engine.run has queued Stop; the thread broadcasts it.
                    with trio.CancelScope(shield=True), trio.move_on_after(self._rank_timeout_s):
                        await ended.wait()
                raise
            except Exception as exc:  # out of the nursery as itself, not as a group
                failure.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        if stalled:
            raise RanksStalled(stalled[0])

    async def _watch(self, scope: trio.CancelScope, stalled: list[str]) -> None:
        while True:
            await trio.sleep(WATCH_TICK_S)
            since = self._busy_since
            timeout = self._rank_timeout_s
            if self._drain is not None and self._drain.draining:
                timeout = min(timeout, DRAINING_RANK_TIMEOUT_S)
            if since is not None and time.monotonic() - since > timeout:
                message = (
                    f"the rank group was lost: the other ranks did not answer for {timeout:g} s "
                    "(--rank-timeout; 5 s at most while shutting down): a rank is stuck, "
                    "gone, or its host unreachable"
                )
                log.critical("rank group stalled: %s", message)
                stalled.append(message)
                scope.cancel()
                return

    # -- the worker's seams ---------------------------------------------------------------

    def _share(self, header: list[int], payload: bytes = b"") -> tuple[list[int], bytes]:
        return self._group.share(header, payload, batch_stream(self._gen))

    def _progress(self) -> None:
        self._busy_since = time.monotonic()

    def _take_command(self, block: bool) -> Any:
        if not block:
            return super()._take_command(False)
        self._busy_since = None
        try:
            return super()._take_command(True)
        finally:
            self._progress()

    def _after_load(self) -> None:
        # Not watched: ranks load at their own pace (minutes apart on different hosts);
        # the watchdog starts with the first command wait, once the model is ready.
        mx.random.seed(self._group.shared_seed())

    def _on_insert(self, req: GenerationRequest, cached: int) -> None:
        self._ops.append(Insert(portable(req), cached))

    def _on_remove(self, uid: int, keep_cache: bool) -> None:
        self._ops.append(Remove(uid, keep_cache))

    def _next(self) -> tuple[list[Any], list[Any]]:
        self._round(STEP)
        return super()._next()

    def _agree_to_cut(self, cut: bool) -> bool:
        self._progress()
        (agreed,), _ = self._share([int(cut)])
        return bool(agreed)

    def _after_next(self, generation_responses: list[Any]) -> None:
        self._progress()
        self._digest = step_digest(generation_responses)

    def _on_batch_failed(self, exc: Exception) -> None:
        if isinstance(exc, RanksLost):
            raise exc
        raise RanksLost(
            f"a step failed on rank 0 ({_describe(exc)}): the ranks' batches can no longer "
            "be kept in step"
        ) from exc

    def _on_idle_tick(self) -> None:
        self._round(0)

    def _on_stop(self) -> None:
        try:
            self._round(STOP)
        except RanksLost as exc:
            log.warning("could not tell the other ranks to stop: %s", exc)

    def _round(self, flags: int) -> None:
        payload = encode(self._ops)
        self._ops = []
        self._progress()
        self._share([flags, self._digest], payload)
        self._progress()


def leader_factory(
    group: RankGroup, rank_timeout_s: float, drain: Any = None
) -> Callable[..., LeaderWorker]:
    """The engine's ``worker_factory`` on rank 0; ``drain``: the server's graceful shutdown."""
    if not math.isfinite(rank_timeout_s) or rank_timeout_s <= 0:
        raise ValueError("rank_timeout_s must be a positive number of seconds")

    def make(config: WorkerConfig, schedule: Callable[..., None]) -> LeaderWorker:
        return LeaderWorker(config, schedule, group, rank_timeout_s, drain)

    return make
