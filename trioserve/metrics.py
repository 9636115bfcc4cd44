"""Prometheus metrics, one registry per app (nothing global), served at ``/metrics``.

The engine gauges (slots, queue, batch) are read at scrape time; with several models each
carries a ``model`` label, and ``trioserve_model_loaded{model}`` says which are loaded.

``RequestObserver`` follows one request's engine events, so the streamed and the
non-streamed paths record time to first token, inter-token latency, token counts, prefill
speed and disconnects the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trioserve.engine.events import Event, Finished, TokenDelta
from trioserve.engine.scheduler import RequestHandle

__all__ = ["CONTENT_TYPE", "Metrics", "RequestObserver"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATE_BUCKETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200)


class Metrics:
    """The server's metrics. ``engine_stats`` lists ``(model name, its EngineStats or None
    while unloaded)``, read at scrape time for the gauges; ``per_model`` labels them."""

    def __init__(
        self,
        engine_stats: Callable[[], list[tuple[str, Any]]],
        *,
        per_model: bool = False,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trioserve_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "trioserve_prompt_tokens",
            "Prompt tokens of requests that reached decoding",
            registry=r,
        )
        self.generated_tokens = Counter(
            "trioserve_generated_tokens", "Tokens generated", registry=r
        )
        self.disconnects = Counter(
            "trioserve_disconnects",
            "Requests whose client went away, by phase",
            ["phase"],
            registry=r,
        )
        self.ttft = Histogram(
            "trioserve_time_to_first_token_seconds",
            "From request arrival to the first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "trioserve_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_rate = Histogram(
            "trioserve_prefill_tokens_per_second",
            "Prompt tokens per second, per request",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        labels = ["model"] if per_model else []
        self._slots_total = Gauge(
            "trioserve_slots", "Slots (parallel sequences)", labels, registry=r
        )
        self._slots_busy = Gauge("trioserve_slots_busy", "Slots in use", labels, registry=r)
        self._queued = Gauge("trioserve_queued_requests", "Requests waiting", labels, registry=r)
        self._in_batch = Gauge(
            "trioserve_sequences_in_batch", "Sequences in the model's batch", labels, registry=r
        )
        self._loaded = (
            Gauge("trioserve_model_loaded", "1 while the model is loaded", labels, registry=r)
            if per_model
            else None
        )
        self._per_model = per_model
        self._engine_stats = engine_stats

    def render(self) -> bytes:
        for name, stats in self._engine_stats():
            values = (
                (stats.slots_total, stats.slots_busy, stats.queue_length, stats.worker.in_batch)
                if stats is not None
                else (0, 0, 0, 0)
            )
            gauges = (self._slots_total, self._slots_busy, self._queued, self._in_batch)
            for gauge, value in zip(gauges, values, strict=True):
                (gauge.labels(model=name) if self._per_model else gauge).set(value)
            if self._loaded is not None:
                self._loaded.labels(model=name).set(int(stats is not None and stats.ready))
        return generate_latest(self.registry)

    def observer(self) -> RequestObserver:
        return RequestObserver(self)


class RequestObserver:
    """Records one request's timings as its events go by."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._arrived = time.monotonic()
        self._last_token: float | None = None

    def on_event(self, event: Event, handle: RequestHandle) -> None:
        if not isinstance(event, TokenDelta | Finished):
            return
        now = time.monotonic()
        if isinstance(event, TokenDelta):
            self._m.generated_tokens.inc()
            if self._last_token is None:
                self._first_token(now, handle)
            else:
                self._m.itl.observe(now - self._last_token)
            self._last_token = now

    def _first_token(self, now: float, handle: RequestHandle) -> None:
        self._m.ttft.observe(now - self._arrived)
        self._m.prompt_tokens.inc(handle.prompt_len)
        admitted = handle.admitted_at
        if admitted is not None and now > admitted:
            self._m.prefill_rate.observe(handle.prompt_len / (now - admitted))

    def disconnected(self, phase: str) -> None:
        self._m.disconnects.labels(phase=phase).inc()
