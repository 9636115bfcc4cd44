"""SIGTERM on a real process: in-flight streams finish or end with an error, exit 0."""

from __future__ import annotations

import json
import signal
import sys
import time

import httpx
import trio

from tests.integration.conftest import free_port, parse_sse, start_process


async def test_sigterm_lets_short_streams_finish_and_ends_long_ones_with_an_error(tmp_path):
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "trioserve",
        "serve",
        "--port",
        str(port),
        "--parallel",
        "2",
        "--shutdown-grace",
        "4",
    ]
    server = start_process(argv, port, tmp_path / "server.log")
    url = server.v1 + "/chat/completions"
    results: dict[str, str] = {}

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
        async with client.stream("POST", url, json=body) as response:
            results[name] = (await response.aread()).decode()

    async with httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as nursery:
        nursery.start_soon(stream, "short", 3, client)
        nursery.start_soon(stream, "long", 3000, client)
        # Polling another process: there is no Trio event to wait on across it.
        while (await client.get(server.url + "/health")).json()["slots_busy"] < 2:  # noqa: ASYNC110
            await trio.sleep(0.02)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
    took = time.monotonic() - started
    code = server.process.wait(timeout=30)
    log = server.log_text()
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
