"""The rank group: who we are, and rank 0's broadcast built from ``all_sum``.

MLX's collectives move arrays only, and the ring backend has no broadcast: rank 0 contributes
its data and every other rank zeros, so the sum is rank 0's data on every rank.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

# Set by mlx.launch in each process it starts.
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE")


class RanksLost(Exception):
    """The rank group can no longer work in step: a peer is gone, stalled, or diverged."""


class RankGroup:
    """An initialized ``mx.distributed`` group of more than one rank."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank: int = group.rank()
        self.size: int = group.size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(
        self, header: list[int], payload: bytes = b"", stream: Any = None
    ) -> tuple[list[int], bytes]:
        """Rank 0's ``header`` (small ints) and ``payload`` on every rank; the other ranks
        pass a header of the same length (its values are ignored) and no payload.

        ``stream``: the stream the model's own collectives run on (mlx-lm's BatchGenerator
        has its own, and evaluates the next step asynchronously there). On that stream ours
        wait for theirs; on another one the two run at once and pair up in a different order
        on each rank (seen: headers summed with a layer's activations).

        One collective when the payload is empty, two otherwise. Raises ``RanksLost`` when a
        peer is gone.
        """
        lead = self.leader
        values = [*header, len(payload)] if lead else [0] * (len(header) + 1)
        try:
            head = mx.distributed.all_sum(
                mx.array(values, dtype=mx.int32), group=self.group, stream=stream
            ).tolist()
            if os.environ.get("TRIOSERVE_RANK_DEBUG"):
                self._n = getattr(self, "_n", 0) + 1
                log.warning("DEBUG r%d #%d %s -> %s", self.rank, self._n, values, head)
            size = head[-1]
            if size == 0:
                return head[:-1], b""
            data = np.frombuffer(payload, dtype=np.uint8) if lead else np.zeros(size, np.uint8)
            summed = mx.distributed.all_sum(mx.array(data), group=self.group, stream=stream)
            return head[:-1], bytes(np.array(summed, copy=False))
        except RuntimeError as exc:  # "[ring] connection to a peer was lost"
            raise RanksLost(f"rank {self.rank}: the rank group was lost: {exc}") from exc

    def shared_seed(self) -> int:
        """One random seed, drawn on rank 0, the same on every rank: sampling that uses
        MLX's global random state then draws the same tokens everywhere."""
        (seed,), _ = self.share([int.from_bytes(os.urandom(3), "little")])
        return seed


def batch_stream(generator: Any) -> Any:
    """The stream mlx-lm's ``BatchGenerator`` runs the model on (None before it exists)."""
    return getattr(generator, "_stream", None)


_joined: RankGroup | None = None  # the process's group (mx.distributed's own is global too)


def current_group() -> RankGroup | None:
    """The group ``join_group`` joined in this process, if any."""
    return _joined


def launched() -> bool:
    """This process was started by ``mlx.launch``."""
    return any(name in os.environ for name in LAUNCH_ENV)


def join_group() -> RankGroup | None:
    """Join the group ``mlx.launch`` set up; None when not launched by it or when alone.
    Raises ``RuntimeError`` (MLX's) when launched but the group cannot be formed."""
    if not launched():
        return None
    group = mx.distributed.init(strict=True)
    if group.size() < 2:
        return None
    global _joined
    log.info("rank %d of %d (mlx.distributed)", group.rank(), group.size())
    _joined = RankGroup(group)
    return _joined
