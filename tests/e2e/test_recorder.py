"""The wire evidence behind the OpenCode verdict: HTTP exchanges rebuilt from raw bytes, and
the server's debug log read back. Sans-IO, so it runs without Node or a model."""

from __future__ import annotations

import json

from tests.e2e.conftest import recorder, serverlog


def _request(body: dict, extra: str = "") -> bytes:
    raw = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n{extra}\r\n"
    )
    return head.encode() + raw


def _chunked(*pieces: str) -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    out += b"transfer-encoding: chunked\r\n\r\n"
    for piece in pieces:
        data = piece.encode()
        out += f"{len(data):x}\r\n".encode() + data + b"\r\n"
    return out + b"0\r\n\r\n"


CHUNK = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "choices": []}


def test_two_streams_on_one_keep_alive_connection():
    progress = "event: prefill_progress\ndata: " + json.dumps({**CHUNK, "fraction": 1.0}) + "\n\n"
    content = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Paris"}}]}
    opt_in = "X-SwiftLM-Prefill-Progress: true\r\n"
    sent = _request({"tools": [{"function": {"name": "read"}}]}, opt_in)
    sent += _request({"messages": []})
    received = _chunked(progress, "data: " + json.dumps(content) + "\n\n", "data: [DONE]\n\n")
    received += _chunked("data: " + json.dumps({**CHUNK, "id": "chatcmpl-def"}) + "\n\n")
    first, second = recorder.parse_exchanges(sent, received)
    assert first.request_headers["x-swiftlm-prefill-progress"] == "true"
    assert first.request_json()["tools"][0]["function"]["name"] == "read"
    assert first.status == 200 and first.complete
    assert [e.name for e in first.sse_events()] == ["prefill_progress", None, None]
    assert [c["id"] for c in first.chunks()] == ["chatcmpl-abc", "chatcmpl-abc"]
    assert "x-swiftlm-prefill-progress" not in second.request_headers
    assert second.complete and second.chunks()[0]["id"] == "chatcmpl-def"


def test_a_cut_stream_is_not_complete():
    received = _chunked("data: " + json.dumps(CHUNK) + "\n\n")[:-5]  # no final chunk
    (exchange,) = recorder.parse_exchanges(_request({}), received)
    assert exchange.status == 200 and not exchange.complete
    assert exchange.chunks() == [CHUNK]


def test_server_log_texts_by_completion_id():
    log = (
        "2026-01-01 DEBUG trioserve.streaming.stream: request 1a (chatcmpl-abc) text: 'Paris.'\n"
        "2026-01-01 INFO trioserve.api.generation: request 2b: chat, 9 prompt tokens\n"
        '2026-01-01 DEBUG trioserve.api.generation: request 2b (chatcmpl-def) text: "it\'s\\n"\n'
    )
    assert serverlog.logged_texts(log) == {"chatcmpl-abc": "Paris.", "chatcmpl-def": "it's\n"}
    assert serverlog.normalized("\x1b[0mThe  capital\n is\x1b[1m Paris") == "The capital is Paris"
