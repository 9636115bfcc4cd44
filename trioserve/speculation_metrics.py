"""``/metrics`` counters of speculative decoding: draft tokens proposed and accepted, per
draft method (``prompt-lookup``, ``prediction``), read at scrape time from the worker's
running totals (``WorkerSnapshot.speculation``), so the MLX thread never touches Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PROPOSED = "trioserve_speculative_draft_tokens"
ACCEPTED = "trioserve_speculative_accepted_tokens"


class SpeculationCollector(Collector):
    """Registers itself; ``engine_stats`` is the ``Metrics`` reader of (model, stats)."""

    def __init__(
        self,
        engine_stats: Callable[[], list[tuple[str, Any]]],
        *,
        per_model: bool,
        registry: CollectorRegistry,
    ) -> None:
        self._engine_stats = engine_stats
        self._labels = ["model", "method"] if per_model else ["method"]
        registry.register(self)

    def describe(self) -> list[Any]:
        return []  # the families come and go with the methods used: collect at scrape time

    def collect(self) -> Iterator[CounterMetricFamily]:
        proposed = CounterMetricFamily(
            PROPOSED, "Draft tokens proposed for verification, by method", labels=self._labels
        )
        accepted = CounterMetricFamily(
            ACCEPTED, "Draft tokens the model accepted, by method", labels=self._labels
        )
        for name, stats in self._engine_stats():
            if stats is None:
                continue
            for method, n_proposed, n_accepted in stats.worker.speculation:
                labels = [name, method] if len(self._labels) == 2 else [method]
                proposed.add_metric(labels, n_proposed)
                accepted.add_metric(labels, n_accepted)
        yield proposed
        yield accepted
