"""Endpoints, shapes, errors, auth and CORS against a real server."""

from __future__ import annotations

import httpx
import pytest

from trioserve.testing import free_port, hypercorn_argv, start_server


def test_models_list(server):
    body = httpx.get(server.v1 + "/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["SmolLM2-135M-Instruct"]
    assert body["data"][0]["object"] == "model"


def test_health_reports_slots_and_queue(server):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["slots_total"] == 2
    assert body["slots_busy"] == 0
    assert body["queue_length"] == 0


def test_non_streamed_chat_carries_usage(server):
    response = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] >= 1


def test_content_parts_system_and_tool_roles_are_accepted(server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "Paris", "tool_call_id": "call_1"},
    ]
    response = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "messages": messages,
            "max_tokens": 4,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "some_unknown_field": {"x": 1},
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_stop_text_is_left_out(server):
    base = {
        "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        "max_tokens": 30,
        "temperature": 0,
    }
    plain = httpx.post(server.v1 + "/chat/completions", json=base, timeout=120).json()
    text = plain["choices"][0]["message"]["content"]
    assert "5" in text, text
    cut = httpx.post(
        server.v1 + "/chat/completions", json={**base, "stop": ["5"]}, timeout=120
    ).json()
    cut_text = cut["choices"][0]["message"]["content"]
    assert "5" not in cut_text
    assert text.startswith(cut_text)
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_max_completion_tokens_gives_length(server):
    response = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_completion_tokens": 3,
        },
        timeout=120,
    )
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_logprobs_are_returned(server):
    response = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Say yes."}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
        },
        timeout=120,
    )
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-4)


def test_completions_non_streamed(server):
    response = httpx.post(
        server.v1 + "/completions",
        json={"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0},
        timeout=120,
    )
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].strip()
    assert body["usage"]["prompt_tokens"] >= 5
    # A completion continues the prompt's text: the first word keeps its space (" Paris").
    assert body["choices"][0]["text"].startswith(" "), body["choices"][0]["text"]


GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error_type", "mentions"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_request_error", "JSON"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_request_error", "object"),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": []},
            400,
            "invalid_request_error",
            "messages",
        ),
        ("POST", "/v1/chat/completions", {}, 400, "invalid_request_error", "messages"),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": GOOD_MESSAGES, "n": 2},
            400,
            "invalid_request_error",
            "n",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "invalid_request_error",
            "role",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": GOOD_MESSAGES, "temperature": 9},
            400,
            "invalid_request_error",
            "temperature",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": GOOD_MESSAGES, "max_tokens": 0},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": GOOD_MESSAGES, "stop": ["a"] * 5},
            400,
            "invalid_request_error",
            "stop",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 9000}]},
            400,
            "invalid_request_error",
            "context length",
        ),
        ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
        (
            "POST",
            "/v1/completions",
            {"prompt": [999999999]},
            400,
            "invalid_request_error",
            "vocabulary",
        ),
        ("GET", "/v1/nowhere", None, 404, "not_found_error", "/v1/nowhere"),
        ("GET", "/v1/chat/completions", None, 405, "invalid_request_error", "GET"),
    ],
)
def test_bad_input_gets_a_clear_error(server, method, path, body, status, error_type, mentions):
    json_type = {"Content-Type": "application/json"}
    kwargs = {"content": body, "headers": json_type} if isinstance(body, bytes) else {"json": body}
    if body is None:
        kwargs = {}
    response = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert mentions.lower() in error["message"].lower()
    # The server is still fine afterwards.
    assert server.health()["slots_busy"] == 0


def test_body_over_the_limit_gets_413(server):
    response = httpx.post(
        server.v1 + "/chat/completions",
        content=b'{"messages": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def guarded(launch):
    return launch("--api-key", "sekret", "--cors", "http://app.example", "--parallel", "1")


def test_api_key_required(guarded):
    body = {"messages": GOOD_MESSAGES, "max_tokens": 2}
    missing = httpx.post(guarded.v1 + "/chat/completions", json=body, timeout=60)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(
        guarded.v1 + "/chat/completions",
        json=body,
        headers={"Authorization": "Bearer nope"},
        timeout=60,
    )
    assert wrong.status_code == 401
    ok = httpx.post(
        guarded.v1 + "/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sekret"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_cors_preflight_reflects_requested_headers(guarded):
    asked = (
        "authorization, content-type, x-stainless-os, x-stainless-lang, x-swiftlm-prefill-progress"
    )
    response = httpx.options(
        guarded.v1 + "/chat/completions",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert response.status_code in {200, 204}
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in asked.split(", "):
        assert header in allowed
    # A normal request from that origin carries the header too.
    got = httpx.get(
        guarded.v1 + "/models",
        headers={"Origin": "http://app.example", "Authorization": "Bearer sekret"},
    )
    assert got.headers["access-control-allow-origin"] == "http://app.example"


def test_no_cors_headers_without_cors_flag(server):
    response = httpx.get(server.v1 + "/models", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in response.headers


def test_hypercorn_command_line_launch(tmp_path, model_dir):
    port = free_port()
    argv = hypercorn_argv(port)
    env = {"TRIOSERVE_PARALLEL": "3", "TRIOSERVE_MODEL": str(model_dir)}
    live = start_server(argv, port, log_path=tmp_path / "hypercorn.log", env=env)
    try:
        assert live.health()["slots_total"] == 3
        response = httpx.post(
            live.v1 + "/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12,
                "temperature": 0,
            },
            timeout=120,
        )
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
    finally:
        live.stop()
