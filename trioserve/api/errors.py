"""Errors in OpenAI's shape: each carries its HTTP status, OpenAI ``type``, ``param`` and ``code``.

Handlers raise these; one place (``as_api_error``) turns any exception into one, so a client
always gets ``{"error": {"message", "type", "param", "code"}}`` and never a traceback. Tree::

    ApiError
    ├── BadRequest (400, invalid_request_error)
    │   └── ContextLengthExceeded (code context_length_exceeded)
    ├── Unauthorized (401, authentication_error, code invalid_api_key)
    ├── NotFound (404, not_found_error)
    ├── MethodNotAllowed (405)
    ├── PayloadTooLarge (413)
    ├── RateLimited (429, rate_limit_error; Retry-After)
    ├── InternalServerError (500, server_error)
    └── ServiceUnavailable (503, server_error; Retry-After)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pydantic

from trioserve.output.chunks import error_payload

__all__ = [
    "ApiError",
    "BadRequest",
    "ContextLengthExceeded",
    "InternalServerError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "as_api_error",
    "from_validation_error",
]


class ApiError(Exception):
    """An error with its HTTP meaning; ``message`` is shown to the client as is."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, code=self.code, param=self.param)

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After``, ``Allow``...)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """The prompt plus ``max_tokens`` does not fit; ``param`` is "prompt" for completions."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str = "Invalid API key.", *, code: str | None = "invalid_api_key"):
        super().__init__(message, code=code)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"

    def __init__(self, message: str, *, allowed: Iterable[str] = ()):
        super().__init__(message)
        self.allowed = tuple(allowed)

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class _RetryAfter(ApiError):
    def __init__(
        self, message: str, *, retry_after_s: float | None = None, code: str | None = None
    ):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; round up so a client never retries too early.
        return {"Retry-After": str(max(0, math.ceil(self.retry_after_s)))}


class RateLimited(_RetryAfter):
    status = 429
    type = "rate_limit_error"


class ServiceUnavailable(_RetryAfter):
    status = 503
    type = "server_error"


class InternalServerError(ApiError):
    status = 500
    type = "server_error"


def _path(loc: tuple[int | str, ...]) -> str:
    # Unions add their member's name to ``loc`` ("str", "list[ContentPart]", "function-after[..]"):
    # the client never wrote those, so leave them out of the path.
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or not ("[" in p or p in {"str", "int", "float", "bool", "none"})
    ]
    return ".".join(parts)


_INPUT = "Input should be "


def _reason(err: Any) -> str:
    msg = str(err["msg"])
    # Our own validators raise ValueError, which pydantic prefixes; the prefix says nothing.
    return msg.removeprefix("Value error, ")


def from_validation_error(err: pydantic.ValidationError, *, limit: int = 3) -> BadRequest:
    """A 400 naming each bad field by its path (``messages.0.role``); ``param`` is the first."""
    # Group by path: a bad union value yields one error per member, which reads as one problem.
    by_path: dict[str, list[str]] = {}
    for e in err.errors(include_url=False, include_input=False):
        reasons = by_path.setdefault(_path(tuple(e["loc"])), [])
        reason = _reason(e)
        if reasons and reason.startswith(_INPUT) and reasons[0].startswith(_INPUT):
            reason = reason.removeprefix(_INPUT)
        if reason not in reasons:
            reasons.append(reason)
    if not by_path:
        return BadRequest("Invalid request body.")
    lines = [
        f"{path}: {' or '.join(reasons)}" if path else " or ".join(reasons)
        for path, reasons in list(by_path.items())[:limit]
    ]
    more = len(by_path) - limit
    if more > 0:
        lines.append(f"and {more} more error{'s' if more > 1 else ''}")
    first = next(iter(by_path)) or None
    return BadRequest("Invalid request: " + "; ".join(lines), param=first)


def as_api_error(exc: BaseException) -> ApiError:
    """The one mapping from any exception to what the client sees. Unknown errors become a
    generic 500 so internals never leak; log ``exc`` before calling this."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return from_validation_error(exc)
    return InternalServerError("Internal server error.")
