"""Errors in Anthropic's shape, for the Messages endpoints.

Before the stream starts, an error is ``{"type": "error", "error": {"type", "message"}}`` with
the HTTP status Anthropic uses (its "Errors" reference); after, the same object is the data of
an ``error`` event (``stream_error_body``). Status and type, by our ``ApiError``'s status:

====================================  ======  =====================
ours                                  status  Anthropic type
====================================  ======  =====================
400 (and other 4xx: 405, 415, 422)    same    invalid_request_error
401                                   401     authentication_error
403                                   403     permission_error
404                                   404     not_found_error
413                                   413     request_too_large
429 (queue full, queue timeout)       529     overloaded_error
500                                   500     api_error
503 (model loading, shutting down)    503     overloaded_error
====================================  ======  =====================

Capacity: Anthropic's 429 ``rate_limit_error`` means "your account hit a rate limit"; its 529
``overloaded_error`` means "the API is temporarily overloaded" for everyone. Our 429s are never
per client: the shared queue is full, or a request waited too long for a slot. That is
overload, so it is a 529 (the SDKs retry 529, as they retry 429, honouring ``Retry-After``,
which the error still carries). Our 503 (the model is still loading, the engine stopped, the
server is draining) has no Anthropic equivalent; it keeps its status (the anthropic SDK has a
``ServiceUnavailableError`` for it and retries it) with the type ``overloaded_error``: a
temporary inability to serve, not an unexpected fault (``api_error``).

``error.message`` starts with the field when a 400 names one that the message does not, since
Anthropic's shape has no ``param`` (its own messages read ``max_tokens: Field required``).
When our error has a ``code`` (``context_length_exceeded``, ``queue_full``, ``model_not_found``
...), ``error.details.error_code`` carries it, where the anthropic SDK (2.16) reads a stable
cause (its ``APIStatusError.error_code``; an unknown one counts as the bare type).
"""

from __future__ import annotations

from typing import Any

from trioserve.api.errors import ApiError

__all__ = [
    "ERROR_TYPES",
    "OVERLOADED_STATUS",
    "anthropic_error_body",
    "anthropic_error_type",
    "anthropic_status",
    "stream_error_body",
]

OVERLOADED_STATUS = 529
# Anthropic's error types by HTTP status (its API reference, "Errors").
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # ours: see the module's docstring
    504: "timeout_error",
    OVERLOADED_STATUS: "overloaded_error",
}
# The codes our streamed errors carry when the server cannot serve for now (the queue, the
# engine, a drain): retrying later helps. Their HTTP forms are our 429 and 503.
_OVERLOADED_CODES = frozenset(
    {"queue_full", "queue_timeout", "engine_unavailable", "server_shutdown"}
)
_KNOWN_TYPES = frozenset(ERROR_TYPES.values())


def anthropic_status(err: ApiError) -> int:
    """The HTTP status for ``err`` on the Messages endpoints."""
    return OVERLOADED_STATUS if err.status == 429 else err.status


def anthropic_error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an Anthropic-side ``status``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _error(error_type: str, message: str, code: str | None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if code:
        error["details"] = {"error_code": code}
    return {"type": "error", "error": error}


def anthropic_error_body(err: ApiError, *, request_id: str | None = None) -> dict[str, Any]:
    """``err`` as Anthropic's error object (the body that goes with ``anthropic_status``)."""
    message = err.message
    if err.param and err.param not in message:
        message = f"{err.param}: {message}"
    body = _error(anthropic_error_type(anthropic_status(err)), message, err.code)
    if request_id is not None:
        body["request_id"] = request_id
    return body


def stream_error_body(message: str, code: str | None, error_type: str) -> dict[str, Any]:
    """The data of an ``error`` event, for an error after the stream started: ``message``,
    ``code`` and ``error_type`` as the shared stream reports them (``queue_full``,
    ``queue_timeout``, ``engine_unavailable``, ``server_shutdown``, ``generation_failed``...;
    ``rate_limit_error`` or ``server_error``). Not serving for now (the queue, the engine, a
    drain) is ``overloaded_error``, as its HTTP form is; a failure is ``api_error``."""
    if code in _OVERLOADED_CODES or error_type == "rate_limit_error":
        kind = "overloaded_error"
    elif error_type in _KNOWN_TYPES and error_type != "rate_limit_error":
        kind = error_type
    else:
        kind = "api_error"
    return _error(kind, message, code)
