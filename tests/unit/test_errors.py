"""Exceptions → OpenAI error bodies, statuses and headers."""

import pydantic
import pytest

from trioserve.api import errors
from trioserve.api.errors import (
    ApiError,
    BadRequest,
    ContextLengthExceeded,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    as_api_error,
    from_validation_error,
)


@pytest.mark.parametrize(
    "exc,status,type_,code,param",
    [
        (BadRequest("x", param="p", code="c"), 400, "invalid_request_error", "c", "p"),
        (Unauthorized(), 401, "authentication_error", "invalid_api_key", None),
        (NotFound("no model"), 404, "not_found_error", None, None),
        (MethodNotAllowed("no"), 405, "invalid_request_error", None, None),
        (PayloadTooLarge("big"), 413, "invalid_request_error", None, None),
        (RateLimited("slow down"), 429, "rate_limit_error", None, None),
        (ServiceUnavailable("busy"), 503, "server_error", None, None),
        (
            ContextLengthExceeded("too long"),
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
    ],
)
def test_mapping(exc, status, type_, code, param):
    assert isinstance(exc, ApiError)
    assert exc.status == status
    assert exc.body() == {
        "error": {"message": exc.message, "type": type_, "param": param, "code": code}
    }


def test_context_length_param_for_completions():
    assert ContextLengthExceeded("too long", param="prompt").body()["error"]["param"] == "prompt"


def test_headers():
    assert RateLimited("x", retry_after_s=1.2).headers() == {"Retry-After": "2"}
    assert RateLimited("x").headers() == {}
    assert ServiceUnavailable("x", retry_after_s=5).headers() == {"Retry-After": "5"}
    assert MethodNotAllowed("x", allowed=["GET", "POST"]).headers() == {"Allow": "GET, POST"}
    assert Unauthorized().headers() == {"WWW-Authenticate": "Bearer"}
    assert BadRequest("x").headers() == {}


class _M(pydantic.BaseModel):
    class _Inner(pydantic.BaseModel):
        role: str

    items: list[_Inner]
    choice: str | dict | None = None
    n: int = 0


def _error(data) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        _M.model_validate(data)
    return info.value


def test_from_validation_error_names_path():
    err = from_validation_error(_error({"items": [{"role": "a"}, {}]}))
    assert isinstance(err, BadRequest) and err.status == 400
    assert err.param == "items.1.role"
    assert "items.1.role: Field required" in err.message


def test_from_validation_error_merges_union_members():
    err = from_validation_error(_error({"items": [], "choice": 5}))
    assert err.param == "choice"
    assert (
        err.message
        == "Invalid request: choice: Input should be a valid string or a valid dictionary"
    )


def test_from_validation_error_limits_count():
    err = from_validation_error(_error({"n": "x", "choice": 5}), limit=1)
    assert err.message.endswith("; and 2 more errors")


def test_as_api_error():
    bad = BadRequest("x")
    assert as_api_error(bad) is bad
    assert as_api_error(_error({})).status == 400
    internal = as_api_error(RuntimeError("secret path /home/x"))
    assert internal.status == 500 and "secret" not in internal.message
    assert isinstance(internal, errors.InternalServerError)
