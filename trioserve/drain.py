"""Graceful shutdown, shared by every in-flight request of one app.

On SIGINT/SIGTERM ``trioserve serve`` calls ``Drain.begin()`` (new requests get 503) and stops
Hypercorn from accepting; after ``grace_s`` it calls ``expire()``, which cancels every
request's ``guard()`` scope. A cancelled stream then ends with an error chunk and ``[DONE]``,
a non-streamed request with a 503, well before Hypercorn's own graceful timeout would cut the
connections without a word. No task per request: the scopes are just registered here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.expired = False
        self._scopes: set[trio.CancelScope] = set()

    def begin(self) -> None:
        self.draining = True

    def expire(self) -> None:
        """The grace period is over: cancel every guarded piece of work."""
        self.expired = True
        for scope in list(self._scopes):
            scope.cancel()

    @contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """A cancel scope that ``expire()`` cancels; check ``cancelled_caught`` after it."""
        scope = trio.CancelScope()
        if self.expired:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
