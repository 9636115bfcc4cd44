"""One request's run against the engine, shared by streamed and whole answers.

``run_generation`` admits the request, waits for its slot, feeds every engine event to the
caller's ``on_event`` and returns how it ended: an ``Ending`` that holds either the
``Finished`` event or the reason there is no answer (busy, unavailable, failed). It logs the
outcome once, with the request id, and counts hang-ups. What the caller does with events
(SSE frames, or collecting a body) is its own business; admission, the shutdown drain,
error mapping and logs are written once, here.

Cancellation: a cancel at any ``await`` in here (a client hang-up, the stream being dropped)
leaves through ``engine.admit``'s block, which frees the slot and drops the sequence from the
batch synchronously; the cancel is logged with the phase it hit and re-raised.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import trio

from trioserve.drain import Drain
from trioserve.engine.events import Event, Failed, Finished
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import (
    Engine,
    EngineNotReady,
    QueueFull,
    QueueTimeout,
    RequestHandle,
)
from trioserve.metrics import RequestObserver

log = logging.getLogger(__name__)

EndKind = Literal["finished", "busy", "unavailable", "failed"]


@dataclass(frozen=True)
class Ending:
    """How a request ended. ``finished`` is set exactly when ``kind == "finished"``."""

    kind: EndKind
    finished: Finished | None = None
    message: str = ""
    code: str = ""
    retry_after_s: float | None = None


class ConsumerGone(Exception):
    """Raised by an ``on_event`` whose client cannot take more (e.g. stopped reading)."""

    reason = "the client stopped reading"


async def run_generation(
    engine: Engine,
    request: GenerationRequest,
    on_event: Callable[[Event], Awaitable[None]],
    *,
    drain: Drain | None = None,
    observer: RequestObserver | None = None,
    on_admitted: Callable[[RequestHandle], None] | None = None,
) -> Ending:
    """Run ``request`` to its end; see the module docstring. ``on_admitted`` is called with
    the handle as soon as the request is queued (the progress heartbeat reads it)."""
    request_id = request.request_id
    try:
        with engine.admit(request) as handle:
            if on_admitted is not None:
                on_admitted(handle)
            ending = await _generate(handle, on_event, drain, observer)
    except QueueFull as exc:
        ending = Ending("busy", message=f"The server is busy: {exc}.", code="queue_full")
        ending = _with_retry(ending, 2)
    except QueueTimeout as exc:
        ending = _with_retry(Ending("busy", message=str(exc), code="queue_timeout"), 5)
    except EngineNotReady as exc:
        ending = _with_retry(Ending("unavailable", message=str(exc), code="engine_unavailable"), 2)
    _log_ending(request_id, ending)
    return ending


async def _generate(
    handle: RequestHandle,
    on_event: Callable[[Event], Awaitable[None]],
    drain: Drain | None,
    observer: RequestObserver | None,
) -> Ending:
    ending: Ending | None = None
    guard = drain.guard() if drain is not None else contextlib.nullcontext(trio.CancelScope())
    try:
        with guard as generation:
            await handle.start()
            async for event in handle.events():
                if observer is not None:
                    observer.on_event(event, handle)
                await on_event(event)
                if isinstance(event, Finished):
                    ending = Ending("finished", finished=event)
                elif isinstance(event, Failed):
                    ending = Ending("failed", message=event.message, code="generation_failed")
    except trio.Cancelled:
        stopping = drain is not None and drain.draining
        _log_abort(
            handle, "cancelled by the shutdown" if stopping else "aborted by the client", observer
        )
        raise
    except ConsumerGone as exc:
        _log_abort(handle, f"dropped ({exc.reason})", observer, phase_label="stalled")
        raise
    if ending is None and generation.cancelled_caught:
        ending = Ending(
            "unavailable", message="The server is shutting down.", code="server_shutdown"
        )
    if ending is None:  # events() ends only after Finished or Failed
        ending = Ending("failed", message="the engine ended the request", code="generation_failed")
    return ending


def _with_retry(ending: Ending, seconds: float) -> Ending:
    return Ending(ending.kind, ending.finished, ending.message, ending.code, seconds)


def _log_abort(
    handle: RequestHandle,
    what: str,
    observer: RequestObserver | None,
    phase_label: str | None = None,
) -> None:
    phase = handle.phase
    log.info(
        "request %s %s while %s, after %d generated token(s)",
        handle.request.request_id,
        what,
        phase,
        handle.completion_tokens,
    )
    if observer is not None:
        observer.disconnected(phase_label or phase)


def _log_ending(request_id: str, ending: Ending) -> None:
    if ending.finished is not None:
        usage = ending.finished.usage
        log.info(
            "request %s done: %d prompt + %d generated tokens, finish=%s",
            request_id,
            usage.prompt_tokens,
            usage.completion_tokens,
            ending.finished.reason,
        )
    else:
        log.info(
            "request %s ended without an answer (%s): %s", request_id, ending.code, ending.message
        )
