"""Errors on the Messages endpoints: Anthropic's shape and statuses, before and in the stream,
and what the official anthropic SDK makes of them."""

from __future__ import annotations

import json

import pytest

from trioserve.api.dialects.messages import (
    anthropic_error_body,
    anthropic_error_type,
    anthropic_status,
    parse_messages_request,
    stream_error_body,
)
from trioserve.api.dialects.messages.errors import ERROR_TYPES
from trioserve.api.errors import (
    ApiError,
    BadRequest,
    ContextLengthExceeded,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
)
from trioserve.api.security import HostNotAllowed, UnsupportedMediaType


@pytest.mark.parametrize(
    "err, status, kind",
    [
        (BadRequest("bad"), 400, "invalid_request_error"),
        (ContextLengthExceeded("too long"), 400, "invalid_request_error"),
        (Unauthorized(), 401, "authentication_error"),
        (HostNotAllowed("host"), 403, "permission_error"),
        (NotFound("no such model", param="model"), 404, "not_found_error"),
        (MethodNotAllowed("GET", allowed=["POST"]), 405, "invalid_request_error"),
        (PayloadTooLarge("big"), 413, "request_too_large"),
        (UnsupportedMediaType("json only"), 415, "invalid_request_error"),
        (RateLimited("busy", code="queue_full", retry_after_s=2), 529, "overloaded_error"),
        (RateLimited("waited", code="queue_timeout", retry_after_s=5), 529, "overloaded_error"),
        (InternalServerError("oops"), 500, "api_error"),
        (ApiError("the engine failed", code="generation_failed"), 500, "api_error"),
        (
            ServiceUnavailable("The model is still loading.", retry_after_s=2),
            503,
            "overloaded_error",
        ),
        (ServiceUnavailable("The server is shutting down."), 503, "overloaded_error"),
    ],
)
def test_each_error_gets_anthropics_status_and_type(err, status, kind):
    assert anthropic_status(err) == status
    body = anthropic_error_body(err)
    assert body["type"] == "error"
    assert body["error"]["type"] == kind and body["error"]["type"] == anthropic_error_type(status)
    assert err.message in body["error"]["message"]


def test_the_body_is_exactly_anthropics_shape():
    assert anthropic_error_body(BadRequest("Invalid request: max_tokens: Field required")) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Invalid request: max_tokens: Field required",
        },
    }


def test_a_code_travels_as_details_error_code_and_a_request_id_at_the_top():
    err = RateLimited("The server is busy: 8 queued.", code="queue_full", retry_after_s=2)
    assert anthropic_error_body(err, request_id="req_1") == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "The server is busy: 8 queued.",
            "details": {"error_code": "queue_full"},
        },
        "request_id": "req_1",
    }
    # Retry-After is the error's own header, whatever the status becomes.
    assert err.headers() == {"Retry-After": "2"}


def test_the_field_leads_the_message_when_the_message_does_not_name_it():
    err = NotFound("'claude-x' is not served here.", param="model", code="model_not_found")
    assert anthropic_error_body(err)["error"]["message"] == "model: 'claude-x' is not served here."
    named = BadRequest("Invalid request: tools.0.name: Field required", param="tools.0.name")
    assert anthropic_error_body(named)["error"]["message"] == named.message


def test_a_parse_error_keeps_its_path_in_the_message():
    with pytest.raises(BadRequest) as err:
        parse_messages_request(
            json.dumps(
                {
                    "model": "m",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
                }
            ).encode()
        )
    message = anthropic_error_body(err.value)["error"]["message"]
    assert message.startswith("Invalid request: messages.0.content.0: ")
    assert "only text content is supported" in message


@pytest.mark.parametrize(
    "status, kind",
    [
        (400, "invalid_request_error"),
        (402, "billing_error"),
        (409, "invalid_request_error"),
        (422, "invalid_request_error"),
        (500, "api_error"),
        (501, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_types_by_status(status, kind):
    assert anthropic_error_type(status) == kind


def test_every_type_is_one_anthropic_defines():
    defined = {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    }
    assert set(ERROR_TYPES.values()) <= defined


# -- in the stream ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message, code, error_type, kind",
    [
        ("The server is busy: 8 queued.", "queue_full", "rate_limit_error", "overloaded_error"),
        (
            "no slot became free within 300 s",
            "queue_timeout",
            "rate_limit_error",
            "overloaded_error",
        ),
        ("The model is not loaded.", "engine_unavailable", "server_error", "overloaded_error"),
        ("The server is shutting down.", "server_shutdown", "server_error", "overloaded_error"),
        ("the engine ended the request", "generation_failed", "server_error", "api_error"),
        ("internal error: KeyError", "internal", "server_error", "api_error"),
        ("something new", "some_future_code", "rate_limit_error", "overloaded_error"),
        ("bad grammar", "x", "invalid_request_error", "invalid_request_error"),
        ("who knows", None, "weird_type", "api_error"),
    ],
)
def test_stream_errors_are_anthropics_error_event(message, code, error_type, kind):
    body = stream_error_body(message, code, error_type)
    error = {"type": kind, "message": message}
    if code:
        error["details"] = {"error_code": code}
    assert body == {"type": "error", "error": error}


def test_before_and_in_the_stream_agree():
    cases = [
        (RateLimited("busy", code="queue_full"), "queue_full", "rate_limit_error"),
        (RateLimited("waited", code="queue_timeout"), "queue_timeout", "rate_limit_error"),
        (
            ServiceUnavailable("loading", code="engine_unavailable"),
            "engine_unavailable",
            "server_error",
        ),
        (ServiceUnavailable("draining", code="server_shutdown"), "server_shutdown", "server_error"),
        (ApiError("failed", code="generation_failed"), "generation_failed", "server_error"),
    ]
    for err, code, error_type in cases:
        before = anthropic_error_body(err)["error"]["type"]
        assert stream_error_body(err.message, code, error_type)["error"]["type"] == before


# -- the anthropic SDK ---------------------------------------------------------------------


def _sdk_response(status: int, body: dict):
    # The anthropic SDK (2.16) is built on httpx2: its responses are what it reads.
    httpx2 = pytest.importorskip("httpx2")
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    return httpx2.Response(status, json=body, request=request)


def _client(max_retries: int = 0):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url="http://127.0.0.1", api_key="x", max_retries=max_retries)


@pytest.mark.parametrize(
    "err, sdk_class",
    [
        (BadRequest("Invalid request: max_tokens: Field required"), "BadRequestError"),
        (Unauthorized(), "AuthenticationError"),
        (NotFound("model: no", param="model", code="model_not_found"), "NotFoundError"),
        (PayloadTooLarge("big"), "ContentTooLargeError"),
        (RateLimited("busy", code="queue_full", retry_after_s=2), "OverloadedError"),
        (InternalServerError("oops"), "InternalServerError"),
        (ServiceUnavailable("loading", retry_after_s=2), "ServiceUnavailableError"),
    ],
)
def test_the_anthropic_sdk_raises_its_own_exception_with_our_message(err, sdk_class):
    anthropic = pytest.importorskip("anthropic")
    body = anthropic_error_body(err)
    exc = _client()._make_status_error_from_response(_sdk_response(anthropic_status(err), body))
    assert type(exc).__name__ == sdk_class and isinstance(exc, getattr(anthropic, sdk_class))
    assert exc.status_code == anthropic_status(err)
    assert (exc.type, exc.api_message) == (body["error"]["type"], body["error"]["message"])
    assert exc.error_code == err.code  # our code, an unknown one to the SDK: the bare type


def test_the_sdk_retries_capacity_errors_and_not_client_errors():
    client = _client(max_retries=2)
    for err, retried in [
        (RateLimited("busy", code="queue_full", retry_after_s=2), True),
        (RateLimited("waited", code="queue_timeout", retry_after_s=5), True),
        (ServiceUnavailable("loading", retry_after_s=2), True),
        (BadRequest("bad"), False),
        (NotFound("no"), False),
    ]:
        response = _sdk_response(anthropic_status(err), anthropic_error_body(err))
        assert client._should_retry(response) is retried


def test_the_sdk_reads_an_error_event_in_a_stream_as_ours():
    # What the SDK's stream does with `event: error`: builds its exception from the data,
    # against the stream's own (200) response.
    anthropic = pytest.importorskip("anthropic")
    body = stream_error_body("The server is busy: 8 queued.", "queue_full", "rate_limit_error")
    exc = _client()._make_status_error(str(body), body=body, response=_sdk_response(200, {}))
    assert isinstance(exc, anthropic.APIStatusError)
    assert (exc.type, exc.api_message) == ("overloaded_error", "The server is busy: 8 queued.")
    assert exc.error_code == "queue_full"
