"""A real ``trioserve serve`` on 127.0.0.1 without a key refuses what a web page could send:
a foreign ``Host`` (DNS rebinding) with 403 and a POST that is not declared JSON (a
cross-origin simple request) with 415, both in OpenAI's error shape; ``--allowed-hosts`` and
``--any-content-type`` let a proxy through. Every request has a timeout."""

from __future__ import annotations

import json

import httpx
import pytest

BODY = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}
RAW = json.dumps(BODY).encode()
TIMEOUT_S = 120


def post(server, *, headers: dict[str, str], body: bytes = RAW) -> httpx.Response:
    return httpx.post(
        server.v1 + "/chat/completions", content=body, headers=headers, timeout=TIMEOUT_S
    )


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.example"])
def test_foreign_host_is_refused(server, host):
    response = post(server, headers={"Host": host, "Content-Type": "application/json"})
    assert response.status_code == 403, response.text
    error = error_of(response)
    assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"]
    page = httpx.get(server.url + "/", headers={"Host": host}, timeout=TIMEOUT_S)
    assert page.status_code == 403  # the playground too: a rebinding page could drive it
    assert server.health()["slots_busy"] == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_post_that_is_not_json_is_refused(server, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = post(server, headers=headers)
    assert response.status_code == 415, response.text
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "-H 'Content-Type: application/json'" in error["message"]


def test_a_local_json_request_is_served(server):
    port = server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        headers = {"Host": host, "Content-Type": "application/json; charset=utf-8"}
        response = post(server, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.fixture(scope="module")
def proxied(launch):
    return launch("--parallel", "1", "--allowed-hosts", "proxy.example", "--any-content-type")


def test_overrides_let_a_proxy_through(proxied):
    # The proxy's own name, and a body sent as text/plain: both served.
    ok = post(proxied, headers={"Host": "proxy.example:443", "Content-Type": "text/plain"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["object"] == "chat.completion"
    # A name not on the list is still refused; loopback names always work.
    refused = post(proxied, headers={"Host": "evil.example", "Content-Type": "application/json"})
    assert refused.status_code == 403
    local = httpx.get(proxied.v1 + "/models", timeout=TIMEOUT_S)
    assert local.status_code == 200
