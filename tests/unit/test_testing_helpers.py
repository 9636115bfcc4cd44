"""trioserve.testing: the SSE parser the tests and tools read streams with, and the server
process helper (on a stand-in HTTP server, so no model is needed)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from trioserve.testing import (
    Event,
    ServerError,
    ServerProcess,
    SSEParser,
    data_objects,
    free_port,
    iter_events,
    parse_events,
    start_server,
)

# -- SSE ---------------------------------------------------------------------------------


def test_a_whole_body_with_comments_names_and_done():
    raw = (
        ": keepalive 1/9\n\n"
        'event: prefill_progress\ndata: {"fraction":0.5}\n\n'
        ': note\ndata: {"a":1}\n\n'
        "data: [DONE]\n\n"
    )
    events = parse_events(raw)
    assert events == [
        Event(None, None, ("keepalive 1/9",)),
        Event("prefill_progress", '{"fraction":0.5}'),
        Event(None, '{"a":1}', ("note",)),
        Event(None, "[DONE]"),
    ]
    assert events[0].is_comment and not events[0].is_done
    assert events[-1].is_done
    assert events[1].json() == {"fraction": 0.5}
    assert data_objects(raw) == [{"fraction": 0.5}, {"a": 1}]
    for event in (events[0], events[-1]):
        with pytest.raises(ValueError):
            event.json()


def test_fields_follow_the_eventsource_rules():
    raw = "data:no space\ndata:  two spaces\ndata\nid: 7\nretry: 10\nfoo: bar\n\n"
    (event,) = parse_events(raw)
    assert event == Event(None, "no space\n two spaces\n")


def test_an_event_name_without_data_and_blank_lines_are_not_events():
    assert parse_events("\n\nevent: lonely\n\n\n") == []


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_ending(newline):
    raw = newline.join(["event: x", "data: a", "data: b", "", "data: [DONE]", "", ""])
    assert parse_events(raw) == [Event("x", "a\nb"), Event(None, "[DONE]")]


def test_a_crlf_split_between_reads_is_one_line_end():
    parser = SSEParser()
    assert parser.feed("data: a\r") == []
    assert parser.feed("\n\r") == []  # "\r\n" ended the line; this "\r" may start a CRLF
    assert parser.feed("\n") == [Event(None, "a")]
    assert not parser.pending


def test_bytes_split_inside_a_character():
    frame = 'data: {"t":"héllo 🙂"}\n\n'.encode()
    parser = SSEParser()
    events = [e for i in range(len(frame)) for e in parser.feed(frame[i : i + 1])]
    assert [e.json() for e in events] == [{"t": "héllo 🙂"}]


def test_an_unfinished_event_is_pending_and_dropped():
    parser = SSEParser()
    assert parser.feed("data: [DONE]\n\ndata: cut") == [Event(None, "[DONE]")]
    assert parser.pending
    assert parser.close() == []
    assert parse_events("data: x\n") == []


def test_a_trailing_cr_ends_its_line_at_the_end_of_input():
    assert parse_events("data: x\r\r") == [Event(None, "x")]


def test_iter_events_over_pieces():
    pieces = ["da", "ta: 1\n", "\ndata: 2\n\n", ": bye\n\n"]
    assert [e.data for e in iter_events(pieces)] == ["1", "2", None]


# -- server processes --------------------------------------------------------------------

# A stand-in server: /health answers 200 with a JSON body, anything else 503.
FAKE_SERVER = """
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200 if self.path == "/health" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("stand-in up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_wait_health_and_stop(tmp_path: Path):
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server(python(FAKE_SERVER, str(port)), port, log_path=log, timeout_s=30)
    try:
        assert server.url == f"http://127.0.0.1:{port}" and server.v1.endswith("/v1")
        assert server.health() == {"path": "/health"}
        assert "stand-in up" in server.log_text()
    finally:
        code = server.stop()
    assert code is not None and server.process.poll() is not None
    assert server.stop() == code  # a second stop is harmless


def test_as_a_context_manager(tmp_path: Path):
    port = free_port()
    with ServerProcess(python(FAKE_SERVER, str(port)), port, log_path=tmp_path / "l") as server:
        assert server.health()["path"] == "/health"
    assert server.process.poll() is not None


def test_an_early_exit_raises_with_the_log_tail(tmp_path: Path):
    argv = python("print('model not found: /nowhere'); raise SystemExit(3)")
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*model not found"):
        start_server(argv, free_port(), log_path=tmp_path / "server.log", timeout_s=30)


def test_a_server_that_never_gets_healthy_is_stopped(tmp_path: Path):
    argv = python("import time; print('loading', flush=True); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"not healthy within 0.5 s(.|\n)*loading"):
        start_server(argv, free_port(), log_path=tmp_path / "server.log", timeout_s=0.5)
    assert time.monotonic() - started < 30


def test_stop_kills_what_ignores_sigterm(tmp_path: Path):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring', flush=True)\n"
        "time.sleep(60)\n"
    )
    server = ServerProcess(python(code), free_port(), log_path=tmp_path / "server.log").start()
    deadline = time.monotonic() + 30
    while "ignoring" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)
    assert server.stop(timeout_s=0.5) == -9
