"""Opt-in prefill progress: who asked for it, and what each progress event says.

A client opts in with ``X-SwiftLM-Prefill-Progress`` (the name SwiftLM's clients already send)
or ``X-Trioserve-Prefill-Progress``. ``ProgressReporter`` says how far the prompt is, as
dialect-neutral fields (SwiftLM's names), and ``LoadingReporter`` that a stream's model is
still loading; each dialect's renderer wraps them in a payload its
strict clients survive (for Chat, a valid chunk with ``choices: []``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from trioserve.config import truthy
from trioserve.engine.scheduler import RequestHandle

PROGRESS_HEADERS = ("X-SwiftLM-Prefill-Progress", "X-Trioserve-Prefill-Progress")
PROGRESS_EVENT = "prefill_progress"


def wants_progress(headers: Mapping[str, str]) -> bool:
    """True when either opt-in header is 1, true, yes or on (any case)."""
    return any(truthy(headers.get(name)) for name in PROGRESS_HEADERS)


class LoadingReporter:
    """Progress fields while a stream waits for its model to load (several models)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._started = time.monotonic()

    def fields(self) -> dict[str, Any]:
        """``status: "loading"``, the ``model`` and ``elapsed_seconds`` (the prompt's size
        is not known before the model's tokenizer is)."""
        return {
            "status": "loading",
            "model": self._model,
            "elapsed_seconds": round(time.monotonic() - self._started, 3),
        }


class ProgressReporter:
    """Progress fields for one stream, with real wall-clock elapsed time."""

    def __init__(self, handle: RequestHandle) -> None:
        self._handle = handle
        self._started = time.monotonic()
        self.last_fraction = 0.0

    def final(self) -> dict[str, Any]:
        """The whole prompt is processed: fraction 1.0."""
        return self.fields(self._handle.prompt_len)

    def fields(self, processed: int | None = None) -> dict[str, Any]:
        """``status`` (queued | processing), ``n_past``, ``n_prompt_tokens``, ``fraction``,
        ``elapsed_seconds`` and, while queued, ``queue_position``."""
        handle = self._handle
        total = handle.prompt_len
        n_past = handle.prompt_processed if processed is None else processed
        fraction = min(1.0, n_past / total) if total else 1.0
        self.last_fraction = fraction
        position = handle.queue_position()
        return {
            "status": "queued" if position is not None else "processing",
            "n_past": n_past,
            "n_prompt_tokens": total,
            "fraction": round(fraction, 4),
            "elapsed_seconds": round(time.monotonic() - self._started, 3),
            "queue_position": position,
        }
