"""How many threads OpenBLAS runs a matmul on, chosen between steps by what else is busy.

Why: two BLAS threads make every phase here 15-30 % faster on a quiet 2-core machine, and up
to twice as slow beside any other busy process (README, Performance): OpenBLAS splits each
matmul between its threads up front, so a thread the kernel parks behind another process
holds the whole call up, and its peer spins meanwhile. So ``auto`` measures, every
``interval_s``, how many cores other processes keep busy (``/proc/stat`` minus this process's
own CPU time) and runs on the cores they leave free: one thread as soon as a neighbour takes
a noticeable share of a core, more again only after the machine has been quiet for a while.

The count changes only between steps, once MLX has finished the step in flight (OpenBLAS must
not change it under a running call). 1 and 2 threads round some matmul sums differently
(an 8x576x576 product: 45 % of its entries differ, by at most 4e-5), so a greedy answer can
differ in a late token with the thread count, as it can with the batch around it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

AUTO = "auto"

# Cores others may keep busy before a thread is given up (measured in the same interval).
_DROP_MARGIN = 0.3
# ...and the quieter margin, held for ``_CALM_SAMPLES`` samples, before one is taken again.
_RISE_MARGIN = 0.15
_CALM_SAMPLES = 3
_INTERVAL_S = 0.5


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def read_cpu_seconds() -> tuple[float, float]:
    """(busy seconds of the CPUs this process may use, since boot; this process's CPU
    seconds, all threads). Busy counts stolen time: a hypervisor's other guests compete too."""
    try:
        allowed = {f"cpu{n}" for n in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        allowed = None
    ticks = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if allowed is not None and name not in allowed:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK"), time.process_time()


def fitting_threads(others: float, cores: int, margin: float) -> int:
    """Threads that fit the cores left over when others keep ``others`` cores busy."""
    return max(1, min(cores, math.floor(cores - others + margin)))


@dataclass
class _Sample:
    at: float
    busy_s: float
    own_s: float


class BlasThreads:
    """Sets OpenBLAS's thread count: fixed, or ``auto`` (see the module's docstring).

    Call ``before_step`` on the MLX thread before each step; ``wait_idle`` blocks until MLX
    has no work in flight. ``set_threads`` is OpenBLAS's ``openblas_set_num_threads``.
    """

    def __init__(
        self,
        set_threads: Callable[[int], None],
        setting: int | str,
        *,
        cores: int | None = None,
        read: Callable[[], tuple[float, float]] = read_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = _INTERVAL_S,
    ) -> None:
        self._set = set_threads
        self.auto = setting == AUTO
        self.cores = cores or usable_cores()
        self._read = read
        self._clock = clock
        self._interval_s = interval_s
        self._last: _Sample | None = None
        self._calm = 0
        self.others = 0.0  # cores other processes kept busy in the last interval
        self.changes = 0
        self.threads = 1 if self.auto else int(setting)
        self._pending: int | None = self.threads  # applied at the first step

    def before_step(self, wait_idle: Callable[[], None]) -> None:
        if self.auto:
            self._measure()
        if self._pending is not None:
            wait_idle()
            self._set(self._pending)
            if self._pending != self.threads:
                self.changes += 1
                log.info(
                    "BLAS threads %d -> %d (other processes kept %.2f of %d cores busy)",
                    self.threads,
                    self._pending,
                    self.others,
                    self.cores,
                )
            self.threads, self._pending = self._pending, None

    def _measure(self) -> None:
        now = self._clock()
        if self._last is not None and now - self._last.at < self._interval_s:
            return
        try:
            busy_s, own_s = self._read()
        except (OSError, ValueError):
            return  # no /proc/stat: stay as we are
        last, self._last = self._last, _Sample(now, busy_s, own_s)
        if last is None:
            return
        # After an idle spell the interval spans it: still what others used meanwhile.
        wall = now - last.at
        self.others = max(0.0, (busy_s - last.busy_s) - (own_s - last.own_s)) / wall
        fewer = fitting_threads(self.others, self.cores, _DROP_MARGIN)
        more = fitting_threads(self.others, self.cores, _RISE_MARGIN)
        if fewer < self.threads:
            self._calm = 0
            self._pending = fewer
        elif more > self.threads:
            self._calm += 1
            if self._calm >= _CALM_SAMPLES:
                self._calm = 0
                self._pending = more
        else:
            self._calm = 0
