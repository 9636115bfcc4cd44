"""``/debug/state`` (only with ``--debug-endpoints``): what a leak check needs to see.

Counts every Trio task in the process by walking the task tree from the root, the OS threads,
the resident memory, the engines' slots and batches, and the ids of the requests in them: at
the top level summed over the loaded models, and per model under ``models`` with its state and
leases. ``tools/stress.py`` compares these before and after a storm of requests.
"""

from __future__ import annotations

import os
import threading

import trio
from quart import Blueprint

from trioserve.api.state import app_state
from trioserve.engine.pool import ServedModel

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
    pool = app_state().models
    per_model = [_model_state(m) for m in pool.models]
    totals = {
        key: sum(m[key] for m in per_model)
        for key in (
            "slots_busy",
            "queue_length",
            "in_batch",
            "tracked",
            "worker_failures",
            "prefill_cuts",
            "prefix_cache_bytes",
            "leases",
        )
    }
    return {
        "tasks": count_tasks(),
        "threads": threading.active_count(),
        "rss_bytes": rss_bytes(),
        "slots_total": sum(m["slots_total"] for m in per_model),
        **totals,
        # Memory handed back, so RSS readings compare: every loaded engine idle.
        "worker_idle": all(m["worker_idle"] for m in per_model),
        "requests": [rid for m in per_model for rid in m["requests"]],
        "models": per_model,
    }


def _model_state(served: ServedModel) -> dict:
    stats = served.stats()
    engine = served.engine
    return {
        "id": served.name,
        "status": served.state.value,
        "leases": served.leases,
        "engine": engine is not None,
        "slots_busy": stats.slots_busy if stats else 0,
        "slots_total": stats.slots_total if stats else 0,
        "queue_length": stats.queue_length if stats else 0,
        "in_batch": stats.worker.in_batch if stats else 0,
        "tracked": stats.worker.tracked if stats else 0,
        "worker_failures": stats.worker.failures if stats else 0,
        "prefill_cuts": stats.worker.prefill_cuts if stats else 0,
        "prefix_cache_bytes": stats.worker.prefix_cache_bytes if stats else 0,
        "worker_idle": stats.worker.idle if stats else True,
        "requests": engine.request_ids() if engine is not None else [],
    }
