"""A client that hangs up frees its slot, in every phase, and the server logs that request's
abort with the phase it was in and how far the generation got."""

from __future__ import annotations

import re
import time
import uuid
from functools import partial

import httpx
import trio

from tests.integration.test_streaming import LONG_PROMPT, fresh
from trioserve.testing import Event, SSEParser

VERY_LONG_PROMPT = LONG_PROMPT * 4  # ~700 tokens: seconds of prefill, over several chunks

# A safety net, not the measure: a cancelled prefill chunk runs to its end (~0.3 s on an
# idle 2-core machine, seconds when other work shares the cores), and the session server
# may still be draining an earlier test's request. Promptness is asserted through the
# server's own record instead: the abort line says the phase and the generated tokens.
SLOT_FREE_WITHIN_S = 30.0


async def wait_slots_free(server, within_s: float = SLOT_FREE_WITHIN_S) -> float:
    """Poll /health until no slot is busy; return how long it took. Fails if a slot is still
    busy after ``within_s``: the regression this guards against is a slot never freed."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            body = (await client.get(server.url + "/health")).json()
            if body["slots_busy"] == 0 and body["in_batch"] == 0:
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, f"slot still busy: {body}"
            await trio.sleep(0.02)


async def logged_abort(server, request_id: str, within_s: float = 10.0) -> tuple[str, int]:
    """The phase and generated-token count from the server's "aborted by the client" line for
    ``request_id``: this request's own line, not any line of the shared log."""
    pattern = re.compile(
        rf"request {re.escape(request_id)} aborted by the client while (\w+), "
        r"after (\d+) generated token"
    )
    deadline = time.monotonic() + within_s
    while not (match := pattern.search(server.log_text())):
        assert time.monotonic() < deadline, f"no abort line for request {request_id}"
        await trio.sleep(0.05)
    return match.group(1), int(match.group(2))


def new_request_id(what: str) -> str:
    return f"disconnect-{what}-{uuid.uuid4().hex[:8]}"


async def next_request_succeeds(server) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            server.v1 + "/chat/completions",
            json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3},
        )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1


async def stream_until(server, body: dict, request_id: str, stop_when) -> None:
    """Open a stream, read its events until ``stop_when(event)``, then hang up."""
    with trio.fail_after(120):
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream(
                "POST",
                server.v1 + "/chat/completions",
                json={**body, "stream": True},
                headers={"X-SwiftLM-Prefill-Progress": "true", "X-Request-Id": request_id},
            ) as response:
                parser = SSEParser()
                async for text in response.aiter_text():
                    if any(stop_when(event) for event in parser.feed(text)):
                        return
    raise AssertionError("the stream ended before the moment to disconnect")


def early_progress(event: Event) -> bool:
    """The moment to hang up mid-prefill: a chunk went through the model (a heartbeat before
    the first one has n_past 0), and most of the prompt is still to come."""
    if event.name != "prefill_progress":
        return False
    progress = event.json()
    return progress["n_past"] > 0 and progress["fraction"] < 0.5


async def test_disconnect_during_prefill(server):
    request_id = new_request_id("prefill")
    body = {"messages": [{"role": "user", "content": fresh(VERY_LONG_PROMPT)}], "max_tokens": 50}
    await stream_until(server, body, request_id, early_progress)
    await wait_slots_free(server)
    assert await logged_abort(server, request_id) == ("prefill", 0)
    await next_request_succeeds(server)


async def test_disconnect_during_decode(server):
    request_id = new_request_id("decode")
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300}

    def first_content(event: Event) -> bool:
        if event.name is not None or event.is_comment or event.is_done:
            return False
        chunk = event.json()
        return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))

    await stream_until(server, body, request_id, first_content)
    await wait_slots_free(server)
    phase, generated = await logged_abort(server, request_id)
    assert phase == "decode"
    assert 1 <= generated < 300, "the generation was not cut short by the hang-up"
    await next_request_succeeds(server)


async def test_disconnect_of_a_non_streamed_request(server):
    # The session server is shared: start from idle, so the busy slot below is this request's.
    await wait_slots_free(server)
    request_id = new_request_id("plain")
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400}
    headers = {"X-Request-Id": request_id}
    with trio.fail_after(120):
        async with httpx.AsyncClient(timeout=120) as client, trio.open_nursery() as nursery:
            url = server.v1 + "/chat/completions"
            nursery.start_soon(partial(client.post, url, json=body, headers=headers))
            # Polling another process: there is no Trio event to wait on across it.
            while (await client.get(server.url + "/health")).json()["slots_busy"] == 0:  # noqa: ASYNC110
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()  # hang up mid-generation
    await wait_slots_free(server)
    phase, generated = await logged_abort(server, request_id)
    assert phase in {"admitted", "prefill", "decode"}  # it held a slot: past the queue
    assert generated < 400, "the generation was not cut short by the hang-up"
    await next_request_succeeds(server)
