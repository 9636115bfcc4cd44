"""Admission is one step: a burst can never queue more than ``--max-queue`` requests."""

from __future__ import annotations

import json

import httpx
import trio

from tests.integration.conftest import parse_sse
from tests.integration.test_disconnect import wait_slots_free

BURST = 10


async def test_a_burst_of_streams_never_exceeds_the_queue_bound(launch):
    # One slot, two places in the queue: of ten simultaneous streams at most three are
    # served; the rest are refused with a 429, or (refused after the headers were sent)
    # with an in-stream queue_full error. Never a fourth stream admitted.
    server = launch("--parallel", "1", "--max-queue", "2", "--queue-timeout", "600")
    url = server.v1 + "/chat/completions"
    outcomes: list[str] = []
    max_queue_seen = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "messages": [{"role": "user", "content": f"Count to {20 + i}."}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
        }
        async with client.stream("POST", url, json=body) as response:
            if response.status_code == 429:
                outcomes.append("429")
                return
            assert response.status_code == 200
            events = parse_sse((await response.aread()).decode())
        payloads = [json.loads(d) for _, d in events if d != "[DONE]"]
        errors = [p["error"] for p in payloads if "error" in p]
        if errors:
            assert errors[0]["code"] == "queue_full", errors
            outcomes.append("queue_full")
        else:
            outcomes.append("served")

    async def watch(client: httpx.AsyncClient, done: trio.Event) -> None:
        nonlocal max_queue_seen
        while not done.is_set():
            health = (await client.get(server.url + "/health")).json()
            max_queue_seen = max(max_queue_seen, health["queue_length"])
            await trio.sleep(0.05)

    with trio.fail_after(240):
        async with httpx.AsyncClient(timeout=200) as client:
            done = trio.Event()
            async with trio.open_nursery() as watcher:
                watcher.start_soon(watch, client, done)
                async with trio.open_nursery() as nursery:
                    for i in range(BURST):
                        nursery.start_soon(one, client, i)
                done.set()
    assert len(outcomes) == BURST
    assert outcomes.count("served") <= 3, outcomes
    assert outcomes.count("served") >= 1, outcomes
    assert max_queue_seen <= 2
    await wait_slots_free(server, within_s=30)
