"""SIGTERM on a real process: in-flight streams finish or end with an error, exit 0; a client
that stops reading cannot hold the exit up; a second SIGTERM exits at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import httpx
import pytest
import trio

from tests.integration.conftest import parse_sse
from trioserve.testing import ServerProcess, SSEParser, free_port, serve_argv, start_server


async def test_sigterm_lets_short_streams_finish_and_ends_long_ones_with_an_error(tmp_path):
    port = free_port()
    argv = serve_argv(port, "--parallel", "2", "--shutdown-grace", "4")
    server = start_server(argv, port, log_path=tmp_path / "server.log")
    try:
        await _sigterm_mid_streams(server)
    finally:
        server.stop()


async def _sigterm_mid_streams(server) -> None:
    url = server.v1 + "/chat/completions"
    results: dict[str, str] = {}
    decoding = {"short": trio.Event(), "long": trio.Event()}

    # Greedy, this prompt runs to max_tokens (seen: 400 of 400): the long stream cannot end
    # on its own within the grace period.
    numbers = "Write the numbers from 1 to 500 on one line, separated by commas, with nothing else."

    async def stream(name: str, max_tokens: int, client: httpx.AsyncClient) -> None:
        body = {
            "messages": [{"role": "user", "content": numbers}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        raw, parser = "", SSEParser()
        async with client.stream("POST", url, json=body) as response:
            async for text in response.aiter_text():
                raw += text
                for event in parser.feed(text):
                    if not event.is_comment and not event.is_done and _has_content(event.json()):
                        decoding[name].set()  # its slot is busy, generating
        results[name] = raw

    # The long stream decodes first; then the short one starts, and SIGTERM goes out as its
    # first token arrives, so it is in flight for certain (a poll of /health could miss a
    # 4-token answer). Every wait is bounded: a stream that never starts or never ends fails.
    with trio.fail_after(240):
        async with httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as nursery:
            nursery.start_soon(stream, "long", 3000, client)
            await decoding["long"].wait()
            nursery.start_soon(stream, "short", 4, client)
            await decoding["short"].wait()
            short_open = "short" not in results
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
    took = time.monotonic() - started
    code = server.process.wait(timeout=30)
    log = server.log_text()
    assert short_open, "the short stream ended before SIGTERM: nothing was in flight"
    assert code == 0, log[-2000:]
    assert "Traceback" not in log
    short = parse_sse(results["short"])
    assert short[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in short[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    long = parse_sse(results["long"])
    assert long[-1] == (None, "[DONE]")
    assert json.loads(long[-2][1])["error"]["code"] == "server_shutdown"
    assert took < 20, f"shutdown took {took:.1f} s with a 4 s grace"


def _has_content(chunk: dict) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


# A stream that cannot end on its own and whose frames are big (~3 KB with 20 top logprobs),
# so a client that reads nothing fills the socket buffers within a few dozen tokens.
STALLING_BODY = json.dumps(
    {
        "messages": [
            {
                "role": "user",
                "content": "Write the numbers from 1 to 500 on one line, separated by commas, "
                "with nothing else.",
            }
        ],
        "temperature": 0,
        "max_tokens": 4000,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 20,
    }
).encode()


def test_sigterm_with_a_client_that_stopped_reading_exits_after_the_send_timeout(tmp_path):
    """M8: Hypercorn's write to a client that reads nothing is shielded, and outlasts any
    cancel; only the write deadline of trioserve.net (--send-timeout) ends it. Without it this
    process would never exit (on any platform: trioserve sets no kernel timeout any more)."""
    send_timeout_s, grace_s = 3, 10  # the grace outlasts the stall: the write blocks mid-drain
    port = free_port()
    argv = serve_argv(
        port,
        "--parallel",
        "1",
        "--send-timeout",
        str(send_timeout_s),
        "--shutdown-grace",
        str(grace_s),
    )
    server = start_server(argv, port, log_path=tmp_path / "server.log")
    client = _stalled_reader(port)
    try:
        _wait_until_decoding(client, server, within_s=120)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # Hypercorn itself gives up on connections at grace + 5 s; a stuck write then has at
        # most one more send timeout. Waiting longer would mean: it hangs.
        bound_s = grace_s + 5 + send_timeout_s + 10
        try:
            code = server.process.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {bound_s} s after SIGTERM:\n{server.log_tail()}"
            ) from None
        took = time.monotonic() - started
        log = server.log_text()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        # Why it exited: this client's connection was closed by the write deadline, after
        # the signal (so it was open, stalled, during the shutdown), and then the server
        # stopped.
        lines = log.splitlines()
        client_port = client.getsockname()[1]
        closed = (
            f"closing the connection of 127.0.0.1:{client_port}: it accepted no data for "
            f"{send_timeout_s} s (--send-timeout)"
        )
        order = [
            _line_index(lines, "received SIGTERM"),
            _line_index(lines, closed),
            _line_index(lines, "INFO trioserve: stopped"),
        ]
        assert None not in order and order == sorted(order), log[-3000:]
        assert took >= send_timeout_s, f"exited {took:.1f} s after SIGTERM: no write waited"
        received = _read_until_closed(client, within_s=5)
        assert b"HTTP/1.1 200" in received
        assert b"data: [DONE]" not in received  # cut, not finished: the write was stalled
    finally:
        client.close()
        server.stop()


def test_a_second_sigterm_exits_at_once_while_the_first_one_drains(tmp_path):
    port = free_port()
    argv = serve_argv(port, "--parallel", "1", "--shutdown-grace", "60", "--send-timeout", "300")
    server = start_server(argv, port, log_path=tmp_path / "server.log")
    client = _stalled_reader(port)  # in flight for minutes: the drain would wait for it
    try:
        _wait_until_decoding(client, server, within_s=120)
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(timeout=2)  # draining: a minute of grace
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=10)
        took = time.monotonic() - started
        log = server.log_text()
        assert code == -signal.SIGTERM, log[-3000:]  # killed by it, as a shell reports 143
        assert "received SIGTERM again: exiting now" in log, log[-3000:]
        assert took < 5
    finally:
        client.close()
        server.stop()


def _stalled_reader(port: int) -> socket.socket:
    """A raw client that sends STALLING_BODY, then keeps its socket open and reads nothing
    (a small receive buffer, so the server's writes block sooner)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(STALLING_BODY)}\r\n\r\n".encode()
        + STALLING_BODY
    )
    return client


def _wait_until_decoding(client: socket.socket, server: ServerProcess, within_s: float) -> None:
    """Until a frame with logprobs has arrived. MSG_PEEK looks without reading: the
    client's receive window stays as full as it was."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            seen = client.recv(1 << 16, socket.MSG_PEEK)
        except TimeoutError:
            seen = b""
        if b"top_logprobs" in seen:
            return
        assert time.monotonic() < deadline, f"no token in {within_s} s:\n{server.log_tail()}"
        time.sleep(0.1)


def _read_until_closed(client: socket.socket, within_s: float) -> bytes:
    """Everything still buffered for the client, up to the server's reset or EOF."""
    deadline = time.monotonic() + within_s
    received = b""
    try:
        while True:
            client.settimeout(max(deadline - time.monotonic(), 0.01))
            if not (data := client.recv(1 << 16)):
                break
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open {within_s} s on") from None
    return received


def _line_index(lines: list[str], text: str) -> int | None:
    return next((i for i, line in enumerate(lines) if text in line), None)


def test_an_idle_keep_alive_connection_does_not_hold_the_exit_up(tmp_path):
    """A client that keeps its connection open after its answers (every SDK does) is idle:
    SIGTERM closes it at once rather than waiting out the grace period for it. (Hypercorn's
    keep-alive timer used to be cancelled by Quart-Trio at the end of each response, so the
    connection was never seen as idle: the server.py ``shield_response_end`` note.)"""
    port = free_port()
    argv = serve_argv(port, "--shutdown-grace", "60")
    log_path = tmp_path / "server.log"
    server = start_server(argv, port, log_path=log_path)
    try:
        with httpx.Client(trust_env=False, timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            assert client.post(server.v1 + "/chat/completions", json=body).status_code == 200
            assert client.get(server.url + "/health").status_code == 200  # the same connection
            assert server.stop(timeout_s=30) == 0  # within the 60 s grace, or it was killed
    finally:
        server.stop()
    log = log_path.read_text()
    assert "received SIGTERM" in log and "stopped" in log
    assert "grace period over" not in log
