"""Faults injected where real faults happen, for tests and the stress tool.

``FaultyWorker`` is the real MLX worker with its per-request seams overridden: a request whose
id contains ``fault-<kind>`` gets a component that raises at the place a real bug, a native
panic or an out-of-memory error would. Production code has no test branch: the worker's own
failure handling is what these faults exercise.

===============  ==========================================================================
kind             what raises
===============  ==========================================================================
``prefill``      a logits processor, on its first call (the step that ends the prefill)
``decode``       a logits processor, on its second call: the first decode step (inside
                 ``BatchGenerator.next()``)
``sampler``      the request's sampler, on its second call (needs temperature > 0)
``detokenizer``  the streaming detokenizer, on the second token (after the step)
``cache-store``  storing the finished sequence's KV cache for prefix reuse
``batch``        the model step itself while this request is in the batch: fails the batch
``crash``        a ``BaseException`` (like a pyo3 panic) from the model step: ends the worker
===============  ==========================================================================

A slow load, deterministically: while the file named by ``TRIOSERVE_FAULT_LOAD_GATE`` exists,
a worker that starts waits (at most ``LOAD_GATE_LIMIT_S``) before it loads its model, so a
test can hold one model "loading" for as long as it needs and end that by deleting the file.
Models already loaded are not affected.

Two ways to serve the real model with this worker: ``python -m trioserve.testing.faults
[serve options]`` is ``trioserve serve`` with it, and ``create_app()`` is a Hypercorn factory
(``hypercorn --worker-class trio 'trioserve.testing.faults:create_app()'``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from trioserve.engine.params import GenerationRequest
from trioserve.engine.worker import Worker

FAULT_KINDS = ("prefill", "decode", "sampler", "detokenizer", "cache-store", "batch", "crash")
_MARKER = re.compile(r"fault-(" + "|".join(re.escape(k) for k in FAULT_KINDS) + r")\b")


LOAD_GATE_ENV = "TRIOSERVE_FAULT_LOAD_GATE"
LOAD_GATE_LIMIT_S = 120.0  # a test that forgets its gate fails slowly, never hangs


class InjectedFault(RuntimeError):
    """What the injected components raise."""


class SimulatedPanic(BaseException):
    """Stands in for pyo3's ``PanicException``, which derives from ``BaseException``."""


def fault_of(request: GenerationRequest) -> str | None:
    """The fault kind named in the request's id, if any."""
    match = _MARKER.search(request.request_id)
    return match.group(1) if match else None


class _RaisingProcessor:
    def __init__(self, calls_before_raising: int) -> None:
        self._left = calls_before_raising

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self._left <= 0:
            raise InjectedFault("injected logits-processor fault")
        self._left -= 1
        return logits


class _RaisingSampler:
    def __init__(self, inner: Any, calls_before_raising: int) -> None:
        self._inner = inner
        self._left = calls_before_raising

    def __call__(self, logprobs: Any) -> Any:
        if self._left <= 0:
            raise InjectedFault("injected sampler fault")
        self._left -= 1
        return self._inner(logprobs)


class _RaisingDetokenizer:
    """Delegates to the real detokenizer, and raises in ``add_token`` on the n-th token."""

    def __init__(self, inner: Any, tokens_before_raising: int) -> None:
        self._inner = inner
        self._left = tokens_before_raising

    def add_token(self, token: int) -> None:
        if self._left <= 0:
            raise InjectedFault("injected detokenizer fault")
        self._left -= 1
        self._inner.add_token(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyWorker(Worker):
    def _run(self, on_ready: Any, deliver: Any) -> None:
        gate = os.environ.get(LOAD_GATE_ENV)
        deadline = time.monotonic() + LOAD_GATE_LIMIT_S
        # On the worker's own thread, before the load: a slow load, as a big model's is.
        while gate and os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        super()._run(on_ready, deliver)

    def _request_processors(self, req: GenerationRequest) -> list[Any]:
        processors = super()._request_processors(req)
        kind = fault_of(req)
        if kind == "prefill":
            processors.append(_RaisingProcessor(0))
        elif kind == "decode":
            processors.append(_RaisingProcessor(1))
        return processors

    def _request_sampler(self, req: GenerationRequest) -> Any:
        sampler = super()._request_sampler(req)
        if fault_of(req) == "sampler" and sampler is not None:
            return _RaisingSampler(sampler, 1)
        return sampler

    def _detokenizer(self, req: GenerationRequest) -> Any:
        detokenizer = super()._detokenizer(req)
        if fault_of(req) == "detokenizer":
            return _RaisingDetokenizer(detokenizer, 1)
        return detokenizer

    def _store_prefix(self, req: GenerationRequest, tokens: list[int], cache: Any) -> None:
        if fault_of(req) == "cache-store":
            raise InjectedFault("injected prefix-cache store fault")
        super()._store_prefix(req, tokens, cache)

    def _next(self) -> tuple[list[Any], list[Any]]:
        kinds = {fault_of(seq.ticket.request) for seq in self._seqs.values()}
        if "crash" in kinds:
            raise SimulatedPanic("injected native panic")
        if "batch" in kinds:
            raise InjectedFault("injected model-step fault")
        return super()._next()


def create_app():  # -> QuartTrio
    """The Hypercorn factory: ``trioserve.app:create_app()`` with ``FaultyWorker``."""
    from trioserve.api.app import create_app as real_create_app

    return real_create_app(worker_factory=FaultyWorker)


def main(argv: list[str] | None = None) -> int:
    """``trioserve serve`` with ``FaultyWorker``."""
    import sys

    from trioserve.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["serve", *args], worker_factory=FaultyWorker)


if __name__ == "__main__":
    raise SystemExit(main())
