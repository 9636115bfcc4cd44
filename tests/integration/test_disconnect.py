"""A client that hangs up frees its slot at once, in every phase."""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import trio

from tests.integration.test_streaming import LONG_PROMPT, fresh

VERY_LONG_PROMPT = LONG_PROMPT * 4  # ~600 tokens in 16-token chunks: seconds of prefill


async def wait_slots_free(server, within_s: float = 1.0) -> float:
    """Poll /health until no slot is busy; return how long it took."""
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        while True:
            body = (await client.get(server.url + "/health")).json()
            if body["slots_busy"] == 0 and body["in_batch"] == 0:
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, f"slot still busy: {body}"
            await trio.sleep(0.02)


async def next_request_succeeds(server) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            server.v1 + "/chat/completions",
            json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3},
        )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1


async def stream_until(server, body: dict, stop_when) -> None:
    """Open a stream, read SSE blocks until ``stop_when(event_name, data)``, then hang up."""
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream(
            "POST",
            server.v1 + "/chat/completions",
            json={**body, "stream": True},
            headers={"X-SwiftLM-Prefill-Progress": "true"},
        ) as response:
            buffer = ""
            async for text in response.aiter_text():
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    name = None
                    for line in block.split("\n"):
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: ") and stop_when(name, line[6:]):
                            return
    raise AssertionError("the stream ended before the moment to disconnect")


async def test_disconnect_during_prefill(server):
    body = {"messages": [{"role": "user", "content": fresh(VERY_LONG_PROMPT)}], "max_tokens": 50}
    await stream_until(
        server,
        body,
        lambda name, data: name == "prefill_progress" and json.loads(data)["fraction"] < 0.5,
    )
    await wait_slots_free(server)
    assert "aborted by the client while prefill" in server.log_text()
    await next_request_succeeds(server)


async def test_disconnect_during_decode(server):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300}

    def first_content(name, data):
        if name is not None or data == "[DONE]":
            return False
        chunk = json.loads(data)
        return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))

    await stream_until(server, body, first_content)
    await wait_slots_free(server)
    assert "aborted by the client while decode" in server.log_text()
    await next_request_succeeds(server)


async def test_disconnect_of_a_non_streamed_request(server):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400}
    async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as nursery:
        nursery.start_soon(partial(client.post, server.v1 + "/chat/completions", json=body))
        # Polling another process: there is no Trio event to wait on across it.
        while (await client.get(server.url + "/health")).json()["slots_busy"] == 0:  # noqa: ASYNC110
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()  # hang up mid-generation
    await wait_slots_free(server)
    await next_request_succeeds(server)
