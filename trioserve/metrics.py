"""Prometheus metrics, one registry per app (nothing global), served at ``/metrics``.

The engine gauges (slots, queue, batch) are read at scrape time; with several models each
carries a ``model`` label, and ``trioserve_model_loaded{model}`` says which are loaded.

Three of them are the ones the Kubernetes Gateway API Inference Extension's model server
protocol asks for (docs/proposals/003-model-server-protocol), named in vLLM's form in our own
namespace, so its endpoint picker (llm-d's too) can be pointed at them (deploy/README.md):
``trioserve:num_requests_waiting`` (TotalQueuedRequests), ``trioserve:num_requests_running``
(TotalRunningRequests) and ``trioserve:kv_cache_usage_perc`` (KVCacheUtilization, 0 to 1).

``RequestObserver`` follows one request's engine events, so the streamed and the
non-streamed paths record time to first token, inter-token latency, token counts, prefill
speed and disconnects the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trioserve.engine.events import Event, Finished, TokenDelta
from trioserve.engine.scheduler import RequestHandle
from trioserve.speculation_metrics import SpeculationCollector

__all__ = [
    "CONTENT_TYPE",
    "KV_CACHE_USAGE",
    "REQUESTS_RUNNING",
    "REQUESTS_WAITING",
    "Metrics",
    "RequestObserver",
]

# The model server protocol's gauges (what an endpoint picker is configured to read).
REQUESTS_WAITING = "trioserve:num_requests_waiting"
REQUESTS_RUNNING = "trioserve:num_requests_running"
KV_CACHE_USAGE = "trioserve:kv_cache_usage_perc"

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
        self._waiting = Gauge(
            REQUESTS_WAITING,
            "Requests waiting for a slot (TotalQueuedRequests of the inference gateway's model "
            "server protocol; the same figure as trioserve_queued_requests)",
            labels,
            registry=r,
        )
        self._running = Gauge(
            REQUESTS_RUNNING,
            "Requests holding a slot, prefilling or decoding (TotalRunningRequests; the same "
            "figure as trioserve_slots_busy)",
            labels,
            registry=r,
        )
        self._kv_usage = Gauge(
            KV_CACHE_USAGE,
            "KV-cache utilisation from 0 to 1 (KVCacheUtilization): tokens held in the "
            "batch's KV caches over slots x the context length a request may use (--ctx-size "
            "or the model's); prefix-cache entries kept for reuse are not counted",
            labels,
            registry=r,
        )
        self._blas_threads = Gauge(
            "trioserve_blas_threads",
            "OpenBLAS threads per matmul now (--blas-threads; auto follows what other "
            "processes leave free); 0: not set by trioserve (OPENBLAS_NUM_THREADS at start)",
            labels,
            registry=r,
        )
        self._loaded = (
            Gauge("trioserve_model_loaded", "1 while the model is loaded", labels, registry=r)
            if per_model
            else None
        )
        # Each engine gauge and what it reads of an EngineStats.
        self._readings = (
            (self._slots_total, attrgetter("slots_total")),
            (self._slots_busy, attrgetter("slots_busy")),
            (self._queued, attrgetter("queue_length")),
            (self._in_batch, attrgetter("worker.in_batch")),
            (self._waiting, attrgetter("queue_length")),
            (self._running, attrgetter("slots_busy")),
            (self._kv_usage, attrgetter("kv_cache_usage")),
            (self._blas_threads, attrgetter("worker.blas_threads")),
        )
        self._per_model = per_model
        self._engine_stats = engine_stats
        SpeculationCollector(engine_stats, per_model=per_model, registry=r)

    def render(self) -> bytes:
        for name, stats in self._engine_stats():
            for gauge, read in self._readings:
                value = read(stats) if stats is not None else 0
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
