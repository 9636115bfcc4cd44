"""One request's lifecycle as an explicit state machine, in the spirit of h11's ``_state.py``.

::

    QUEUED ──► ADMITTED ──► PREFILL ──► DECODE ──► FINISHED
       │           │           │          │
       └───────────┴───────────┴──────────┴──────► FAILED | CANCELLED

``ADMITTED``: a slot is held and the request was handed to the worker; ``PREFILL``: the worker
reported prompt progress; ``DECODE``: the first token came. Every transition goes through
``advance``, which raises ``IllegalTransition`` for anything not in the table, so a bug shows
up where it happens instead of as a leaked slot later. What a state means for resources is
derived from the state, not kept in flags beside it: ``holds_slot`` and ``in_worker``.
"""

from __future__ import annotations

import enum


class RequestState(enum.Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ENDS = {RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED}
_LIVE = {RequestState.ADMITTED, RequestState.PREFILL, RequestState.DECODE}

# state -> the states it may move to (staying put is allowed where events repeat).
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.QUEUED: frozenset(
        {RequestState.ADMITTED, RequestState.FAILED, RequestState.CANCELLED}
    ),
    # A prompt served whole from the prefix cache may go straight to its first token, and an
    # answer whose first token is end-of-sequence straight to FINISHED.
    RequestState.ADMITTED: frozenset({RequestState.PREFILL, RequestState.DECODE, *_ENDS}),
    RequestState.PREFILL: frozenset({RequestState.PREFILL, RequestState.DECODE, *_ENDS}),
    RequestState.DECODE: frozenset({RequestState.DECODE, *_ENDS}),
    RequestState.FINISHED: frozenset(),
    RequestState.FAILED: frozenset(),
    RequestState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A request was moved along an edge the lifecycle does not have (a bug)."""


class Lifecycle:
    """The state of one request; only ``advance`` changes it."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = RequestState.QUEUED

    def advance(self, new: RequestState) -> RequestState:
        """Move to ``new``; return the state it left."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"request cannot go from {old.value} to {new.value}")
        self.state = new
        return old

    @property
    def ended(self) -> bool:
        return self.state in _ENDS

    @property
    def holds_slot(self) -> bool:
        """A slot is held exactly while the request is admitted and not yet ended."""
        return self.state in _LIVE

    @property
    def in_worker(self) -> bool:
        """The worker may still hold the sequence (it was handed over and not ended)."""
        return self.state in _LIVE
