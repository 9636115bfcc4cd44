"""The MLX worker of every rank but 0: it mirrors rank 0's batch, step by step.

A follower has no API, no events and no decisions of its own: it applies the operations of
each round rank 0 sends (rounds.py), steps when told, cuts a prefill chunk when told, and
keeps the same prefix cache (it stores what rank 0 stores, so lookups agree).
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from trioserve.engine.distributed.group import RankGroup, RanksLost, batch_stream
from trioserve.engine.distributed.rounds import STEP, STOP, Insert, decode
from trioserve.engine.distributed.rounds import digest as step_digest
from trioserve.engine.memory import release_free_heap
from trioserve.engine.worker import Deliver, Ticket, Worker, WorkerConfig, _Sequence

log = logging.getLogger(__name__)


class RanksDiverged(RanksLost):
    """This rank's batch no longer matches rank 0's."""


class FollowerWorker(Worker):
    def __init__(self, config: WorkerConfig, group: RankGroup) -> None:
        super().__init__(config, schedule=lambda fn, *args: None)
        self._group = group
        self._digest = 0
        self._idle = False

    def _serve_once(self, deliver: Deliver) -> bool:
        (flags, digest), payload = self._share([0, 0], b"")
        if digest != self._digest:
            raise RanksDiverged(
                f"rank {self._group.rank}: the last step's tokens differ from rank 0's"
            )
        for op in decode(payload):
            if isinstance(op, Insert):
                self._insert(op)
            else:
                self._remove(op.uid, op.keep_cache)
        if flags & STOP:
            return False
        if flags & STEP:
            self._idle = False
            self._step([])
        elif not self._seqs and not self._idle:  # rank 0 went idle: give memory back too
            self._idle = True
            mx.clear_cache()
            release_free_heap()
        return True

    def _insert(self, op: Insert) -> None:
        before = len(self._seqs)
        self._submit(Ticket(op.request), [])
        seq = next(reversed(self._seqs.values()), None) if len(self._seqs) > before else None
        if seq is None or seq.cached != op.cached:
            raise RanksDiverged(
                f"rank {self._group.rank}: request {op.request.request_id} entered the batch "
                "differently than on rank 0"
            )

    def _remove(self, uid: int, keep_cache: bool) -> None:
        seq = self._seqs.get(uid)
        if seq is not None:
            self._drop(seq, keep_cache=keep_cache)
        else:  # rank 0 removed a sequence it had already seen finish: do the same
            self._gen.remove([uid], return_prompt_caches=keep_cache)

    # -- the worker's seams ---------------------------------------------------------------

    def _share(self, header: list[int], payload: bytes = b"") -> tuple[list[int], bytes]:
        return self._group.share(header, payload, batch_stream(self._gen))

    def _after_load(self) -> None:
        mx.random.seed(self._group.shared_seed())

    def _agree_to_cut(self, cut: bool) -> bool:
        (agreed,), _ = self._share([0])
        return bool(agreed)

    def _after_next(self, generation_responses: list[Any]) -> None:
        self._digest = step_digest(generation_responses)

    def _on_batch_failed(self, exc: Exception) -> None:
        if isinstance(exc, RanksLost):
            raise exc
        raise RanksLost(f"rank {self._group.rank}: a step failed: {exc!r}") from exc

    def _on_token(self, seq: _Sequence, r: Any, events: list[Any]) -> None:
        # Stop strings and faults are rank 0's to judge (a Remove follows); a sequence that
        # mlx-lm finished itself (length, end of sequence) is finished here too.
        if r.finish_reason is not None:
            self._seqs.pop(seq.uid, None)
            self._by_ticket.pop(seq.ticket, None)
            self._keep_prefix(seq, r.all_tokens, r.prompt_cache)

    def _fail_one(self, seq: _Sequence, exc: BaseException, events: list[Any]) -> None:
        seq.fault.error = None  # rank 0 judged the same sequence and sends its Remove


def run_follower(config: WorkerConfig, group: RankGroup) -> int:
    """Serve as rank ``group.rank`` until rank 0 says stop (0) or the group is lost (1).
    Blocks the calling thread, which becomes this rank's MLX thread."""
    worker = FollowerWorker(config, group)
    try:
        worker.run(lambda tokenizer: None, lambda events, snapshot: None)
    except RanksLost as exc:
        log.error("%s", exc)
        return 1
    log.info("rank %d: rank 0 stopped; exiting", group.rank)
    return 0
