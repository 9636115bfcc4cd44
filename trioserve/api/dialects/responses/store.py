"""Finished responses kept in memory, for ``previous_response_id`` and ``GET``/``DELETE
/v1/responses/{id}``.

Bounded two ways: at most ``max_entries`` responses (the oldest stored goes first) and none
older than ``max_age_s`` (an expired one is gone on the next access or put). Nothing survives a
restart. Used from the Trio thread only, so it takes no lock.

The store keeps the objects it is given, without copying them: callers must not change a
response object or conversation after ``put``, nor what ``get`` returns.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_ENTRIES",
    "ResponseStore",
    "StoredResponse",
]

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_AGE_S = 3600.0


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: the ``response`` object as the API returns it, and the template
    messages of its input and output (``conversation``) that a ``previous_response_id``
    continues from."""

    response_id: str
    response: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    stored_at: float  # the store's clock at put


class ResponseStore:
    """In-memory responses by id. ``max_entries`` 0 keeps nothing."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, not {max_entries}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0, not {max_age_s}")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        self._drop_expired(self._clock())
        return len(self._entries)

    def __contains__(self, response_id: object) -> bool:
        return isinstance(response_id, str) and self.get(response_id) is not None

    def put(
        self,
        response_id: str,
        response_object: dict[str, Any],
        conversation: Sequence[dict[str, Any]],
    ) -> None:
        """Keep a finished response (a second put of the same id replaces it, as new)."""
        now = self._clock()
        self._drop_expired(now)
        if self.max_entries == 0:
            return
        self._entries.pop(response_id, None)
        self._entries[response_id] = StoredResponse(
            response_id, response_object, tuple(conversation), now
        )
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None if it was never stored, was deleted, was evicted or
        has expired."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if self._expired(entry, self._clock()):
            del self._entries[response_id]
            return None
        return entry

    def delete(self, response_id: str) -> bool:
        """Forget a response; False if there was none (or it had expired)."""
        entry = self._entries.pop(response_id, None)
        return entry is not None and not self._expired(entry, self._clock())

    def _expired(self, entry: StoredResponse, now: float) -> bool:
        return now - entry.stored_at >= self.max_age_s

    def _drop_expired(self, now: float) -> None:
        # Oldest first: stop at the first one still fresh.
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if not self._expired(oldest, now):
                break
            self._entries.popitem(last=False)
