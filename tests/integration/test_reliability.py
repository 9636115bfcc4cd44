"""Faults, overload, slow readers and metrics against a real server process."""

from __future__ import annotations

import json
import socket
import time
from functools import partial

import httpx
import trio

from tests.integration.conftest import parse_sse
from tests.integration.test_disconnect import wait_slots_free
from trioserve.metrics import KV_CACHE_USAGE, REQUESTS_RUNNING, REQUESTS_WAITING
from trioserve.models.loading import model_context_length

STORY = [{"role": "user", "content": "Tell me a very long story about a dragon."}]


def chat(content_or_messages, **extra) -> dict:
    messages = (
        content_or_messages
        if isinstance(content_or_messages, list)
        else [{"role": "user", "content": content_or_messages}]
    )
    return {"messages": messages, "max_tokens": 12, "temperature": 0, **extra}


async def stream_text(client: httpx.AsyncClient, url: str, body: dict, headers=None) -> str:
    async with client.stream(
        "POST", url, json={**body, "stream": True}, headers=headers or {}
    ) as response:
        assert response.status_code == 200
        return (await response.aread()).decode()


async def wait_busy(client: httpx.AsyncClient, base: str, slots: int) -> None:
    # Polling another process: there is no Trio event to wait on across it.
    deadline = time.monotonic() + 60
    while (await client.get(base + "/health")).json()["slots_busy"] < slots:  # noqa: ASYNC110
        assert time.monotonic() < deadline, "the slot never became busy"
        await trio.sleep(0.02)


async def test_queue_limit_gives_429_with_retry_after(launch):
    server = launch("--parallel", "1", "--max-queue", "1")
    url = server.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as nursery:
        nursery.start_soon(partial(client.post, url, json=chat(STORY, max_tokens=400)))
        await wait_busy(client, server.url, 1)
        nursery.start_soon(partial(client.post, url, json=chat("Say hi.")))
        deadline = time.monotonic() + 30
        while (await client.get(server.url + "/health")).json()["queue_length"] < 1:  # noqa: ASYNC110
            assert time.monotonic() < deadline
            await trio.sleep(0.02)
        rejected = await client.post(url, json=chat("Say hi."))
        assert rejected.status_code == 429
        assert rejected.json()["error"]["type"] == "rate_limit_error"
        assert int(rejected.headers["Retry-After"]) >= 1
        nursery.cancel_scope.cancel()
    await wait_slots_free(server)


async def test_queue_timeout_errors_plain_and_streamed(launch):
    server = launch("--parallel", "1", "--queue-timeout", "0.5", "--max-queue", "8")
    url = server.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as nursery:
        nursery.start_soon(partial(client.post, url, json=chat(STORY, max_tokens=400)))
        await wait_busy(client, server.url, 1)
        plain = await client.post(url, json=chat("Say hi."))
        assert plain.status_code == 429
        assert plain.json()["error"]["code"] == "queue_timeout"
        raw = await stream_text(client, url, chat("Say hi."))
        events = parse_sse(raw)
        assert events[-1] == (None, "[DONE]")
        error = json.loads(events[-2][1])["error"]
        assert error["code"] == "queue_timeout" and "no slot" in error["message"]
        nursery.cancel_scope.cancel()
    await wait_slots_free(server)


def test_a_client_that_stops_reading_is_dropped_after_send_timeout(launch):
    server = launch("--parallel", "1", "--send-timeout", "1")
    body = json.dumps(
        {
            # Greedy, this prompt runs to max_tokens (seen: 400 of 400), so the stream cannot
            # end on its own before the buffers fill.
            "messages": [
                {
                    "role": "user",
                    "content": "Write the numbers from 1 to 500 on one line, separated by "
                    "commas, with nothing else.",
                }
            ],
            "temperature": 0,
            "max_tokens": 4000,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,  # ~3 KB a frame: the socket buffers fill in seconds
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"Content-Type: application/json"
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # Read nothing, keep the socket open, and watch the slot come free: dropped by the
        # stream's send timeout, or first by the connection's write deadline (trioserve/net.py,
        # the same --send-timeout), which resets the socket and counts as the client going
        # away. The stream-side path alone is proven exactly in the cancellation matrix.
        dropped = ("the client stopped reading", "aborted by the client while decode")
        deadline = time.monotonic() + 120
        while True:
            health = server.health()
            log = server.log_text()
            if health["slots_busy"] == 0 and any(line in log for line in dropped):
                break
            assert time.monotonic() < deadline, f"the stalled stream kept its slot: {health}"
            time.sleep(0.2)
        # The connection is gone too, not held open until the client reads: what was
        # buffered arrives, then the stream ends without [DONE] (reset or EOF).
        received = read_until_closed(sock, within_s=30)
        assert b"HTTP/1.1 200" in received
        assert b"data: [DONE]" not in received
    finally:
        sock.close()
    response = httpx.post(server.v1 + "/chat/completions", json=chat("Say hi."), timeout=120)
    assert response.status_code == 200


def read_until_closed(sock: socket.socket, within_s: float) -> bytes:
    """Everything the peer sends until it closes or resets; fails if it is still open."""
    deadline = time.monotonic() + within_s
    received = b""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if not (data := sock.recv(65536)):
                break
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open {within_s} s") from None
    return received


def metric(metrics: str, name: str, labels: str = "") -> float:
    """One sample of the Prometheus text, 0 when absent (a counter not yet incremented)."""
    sample = f"{name}{{{labels}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_tokens_and_latency(server):
    # The session server is shared: from idle, so the deltas are this request's own.
    await wait_slots_free(server)
    async with httpx.AsyncClient(timeout=120) as client:
        before = (await client.get(server.url + "/metrics")).text
        response = await client.post(server.v1 + "/chat/completions", json=chat("Say hi."))
        assert response.status_code == 200
        await wait_slots_free(server)
        after = (await client.get(server.url + "/metrics")).text
    usage = response.json()["usage"]

    def delta(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    ok = 'endpoint="/v1/chat/completions",status="200"'
    assert delta("trioserve_requests_total", ok) == 1
    assert delta("trioserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("trioserve_generated_tokens_total") == usage["completion_tokens"]
    assert delta("trioserve_time_to_first_token_seconds_count") == 1
    assert delta("trioserve_time_to_first_token_seconds_sum") > 0
    # One gap between each pair of consecutive tokens.
    assert delta("trioserve_inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    assert delta("trioserve_prefill_tokens_per_second_count") == 1
    # The gauges are read from the engine at scrape time: two slots, all idle again.
    assert metric(after, "trioserve_slots") == 2
    assert metric(after, "trioserve_slots_busy") == 0
    assert metric(after, "trioserve_queued_requests") == 0
    assert metric(after, "trioserve_sequences_in_batch") == 0


GATEWAY_GAUGES = (REQUESTS_WAITING, REQUESTS_RUNNING, KV_CACHE_USAGE)


async def test_the_inference_gateway_gauges_follow_the_queue_the_slot_and_the_kv_cache(
    launch, model_dir
):
    server = launch("--parallel", "1", "--max-queue", "1")  # the 429 test's server
    context = model_context_length(model_dir)  # no --ctx-size: the model's own
    url = server.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        await wait_slots_free(server)
        probe = await client.post(url, json=chat(STORY, max_tokens=1))
        prompt = probe.json()["usage"]["prompt_tokens"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, url, json=chat(STORY, max_tokens=400)))
            await wait_busy(client, server.url, 1)
            nursery.start_soon(partial(client.post, url, json=chat("Say hi.")))
            # Polling another process: one request decoding (its cache past the prompt), one
            # waiting for the slot.
            deadline = time.monotonic() + 60
            while True:
                text = (await client.get(server.url + "/metrics")).text
                held = round(metric(text, KV_CACHE_USAGE) * context)  # one slot
                if metric(text, REQUESTS_WAITING) == 1 and held > prompt:
                    break
                assert time.monotonic() < deadline, text
                await trio.sleep(0.02)
            assert metric(text, REQUESTS_RUNNING) == 1
            # The prompt and the tokens generated so far, over the slot's context.
            assert prompt < held <= prompt + 400
            nursery.cancel_scope.cancel()
    await wait_slots_free(server)
    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(server.url + "/metrics")).text
    assert [metric(text, name) for name in GATEWAY_GAUGES] == [0, 0, 0]
    assert all(f"# TYPE {name} gauge" in text for name in GATEWAY_GAUGES)
