"""``/debug/state`` (only with ``--debug-endpoints``): what a leak check needs to see.

Counts every Trio task in the process by walking the task tree from the root, the OS threads,
the resident memory, the engine's slots and batch, and the ids of the requests in it.
``tools/stress.py`` compares these before and after a storm of requests.
"""

from __future__ import annotations

import os
import threading

import trio
from quart import Blueprint

from trioserve.api.state import app_state

debug_routes = Blueprint("debug", __name__)


def count_tasks() -> int:
    """All live Trio tasks, walked from the root task through every nursery."""
    count = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def rss_bytes() -> int:
    """Resident set size from /proc (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@debug_routes.get("/debug/state")
async def debug_state():
    stats = app_state().engine.stats()
    return {
        "tasks": count_tasks(),
        "threads": threading.active_count(),
        "rss_bytes": rss_bytes(),
        "slots_busy": stats.slots_busy,
        "slots_total": stats.slots_total,
        "queue_length": stats.queue_length,
        "in_batch": stats.worker.in_batch,
        "tracked": stats.worker.tracked,
        "worker_failures": stats.worker.failures,
        "prefill_cuts": stats.worker.prefill_cuts,
        "prefix_cache_bytes": stats.worker.prefix_cache_bytes,
        "worker_idle": stats.worker.idle,  # memory handed back: RSS readings compare
        "requests": app_state().engine.request_ids(),
    }
