"""Which model a request gets, its lease, and the models as ``/v1/models`` shows them.

A lease covers the whole generation, and a streamed body runs after its handler returned, so
the body returns it when it ends; should Quart never enter the body (the client left between
the handler and the first byte), the request's own end returns it (``at_request_end``, called
by the ASGI wrapper in ``api.app`` when the HTTP exchange is over). ``Lease.release`` is
idempotent: whichever comes first returns it, exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import request

from trioserve.api.errors import ApiError, BadRequest, NotFound, RateLimited, ServiceUnavailable
from trioserve.api.state import AppState
from trioserve.engine.pool import (
    InsufficientMemory,
    Lease,
    ModelState,
    PoolClosed,
    PoolError,
    ServedModel,
    SlotTimeout,
    UnknownModel,
)

# The ASGI scope's key for the callbacks run when the HTTP exchange ends.
REQUEST_END_KEY = "trioserve.at_request_end"


def pick(state: AppState, asked: str | None) -> ServedModel:
    """The model the request's ``model`` names (any name, with one model served)."""
    try:
        return state.models.get(asked)
    except PoolError as exc:
        raise as_api_error(exc) from None


async def acquire(state: AppState, served: ServedModel) -> Lease:
    """A lease on ``served`` (waiting for its load), returned at the latest when the HTTP
    exchange ends; the caller returns it earlier when its work is done."""
    lease = await wait_for_lease(state, served)
    at_request_end(lease.release)  # no checkpoint since the count went up
    return lease


async def wait_for_lease(state: AppState, served: ServedModel) -> Lease:
    """A lease on ``served``; the caller owns it. A wait for a load ends, like a queued
    request's wait for a slot, when the shutdown's grace period is over (503)."""
    with state.drain.guard():
        try:
            return await state.models.acquire(served)
        except PoolError as exc:
            raise as_api_error(exc) from None
    # Here only when the drain expired and cancelled the wait: no lease was taken.
    raise ServiceUnavailable(
        "The server is shutting down.", code="server_shutdown", retry_after_s=2
    )


def at_request_end(callback: Callable[[], None]) -> None:
    callbacks = request.scope.get(REQUEST_END_KEY)
    if callbacks is not None:
        callbacks.append(callback)


def as_api_error(exc: PoolError) -> ApiError:
    if isinstance(exc, UnknownModel):
        if exc.asked is None:
            return BadRequest(str(exc), param="model", code="model_required")
        return NotFound(str(exc), param="model", code=exc.code)
    if isinstance(exc, SlotTimeout):  # as a queue timeout is
        return RateLimited(str(exc), code=exc.code, retry_after_s=5)
    retry = 2 if isinstance(exc, PoolClosed | InsufficientMemory) else None
    return ServiceUnavailable(str(exc), code=exc.code, retry_after_s=retry)


def model_object(state: AppState, served: ServedModel) -> dict[str, Any]:
    """OpenAI's model object; with several models, plus its ``status``."""
    body: dict[str, Any] = {
        "id": served.name,
        "object": "model",
        "created": state.created,
        "owned_by": "trioserve",
    }
    if state.models.several:
        body["status"] = served.state.value
        if served.state is ModelState.FAILED:
            body["error"] = served.failure
    return body


def model_health(state: AppState, served: ServedModel) -> dict[str, Any]:
    """One model's line in ``/health`` (several models)."""
    stats = served.stats()
    body: dict[str, Any] = {
        "id": served.name,
        "status": served.state.value,
        "slots_total": stats.slots_total if stats else state.config.parallel,
        "slots_busy": stats.slots_busy if stats else 0,
        "queue_length": stats.queue_length if stats else 0,
        "leases": served.leases,
    }
    if served.failure:
        body["error"] = served.failure
    return body
