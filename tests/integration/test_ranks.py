"""One model over three ranks with mlx.distributed (ring backend, loopback): the same
greedy answers as one rank, a disconnect mid-prefill dropped on every rank, and failure
bounded: a rank killed or stalled makes rank 0 fail its requests and exit, never hang.

Marked ``ranks`` (``pytest -m ranks``); each rank group takes ~30 s to start on 2 cores.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import trio

from tests.integration.test_disconnect import (
    VERY_LONG_PROMPT,
    early_progress,
    logged_abort,
    new_request_id,
    stream_until,
    wait_slots_free,
)
from tests.integration.test_streaming import fresh
from trioserve.testing import Event, SSEParser
from trioserve.testing.ranks import RankGroup

pytestmark = pytest.mark.ranks

GROUP_ARGS = ("--parallel", "2", "--prefill-step-size", "32")


def chat(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


# Few tokens: on 2 cores a step of three ranks takes a few tenths of a second.
CAPITAL = chat("What is the capital of France?", max_tokens=10)
STOPPED = chat("What is the capital of France?", max_tokens=10, stop=["France is"])
STORY = chat("Tell me a story about a lighthouse keeper.", max_tokens=12)


async def stream(v1: str, body: dict) -> tuple[str, list[dict]]:
    """The streamed answer's text and its error objects (an error frame ends a failed one)."""
    text, errors = [], []
    async with httpx.AsyncClient(timeout=180) as client:
        async with client.stream(
            "POST", v1 + "/chat/completions", json={**body, "stream": True}
        ) as response:
            assert response.status_code == 200, await response.aread()
            parser = SSEParser()
            async for piece in response.aiter_text():
                for event in parser.feed(piece):
                    _collect(event, text, errors)
    return "".join(text), errors


def _collect(event: Event, text: list[str], errors: list[dict]) -> None:
    if event.is_comment or event.is_done or event.name is not None:
        return
    chunk = event.json()
    if "error" in chunk:
        errors.append(chunk["error"])
    for choice in chunk.get("choices", []):
        text.append(choice["delta"].get("content") or "")


async def answers(v1: str, bodies: list[dict]) -> list[str]:
    """Stream ``bodies`` at once (so they share the batch); their texts, in order."""
    results: list[str] = [""] * len(bodies)

    async def one(i: int) -> None:
        text, errors = await stream(v1, bodies[i])
        assert not errors, errors
        results[i] = text

    async with trio.open_nursery() as nursery:
        for i in range(len(bodies)):
            nursery.start_soon(one, i)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    group = RankGroup(tmp_path_factory.mktemp("ranks"), *GROUP_ARGS, "--rank-timeout", "20")
    try:
        yield group.start()
    finally:
        group.stop()


async def test_three_ranks_give_the_greedy_answers_of_one(ranks, server):
    # Two sequences share the batch: one ends on a stop string (rank 0's decision, sent to
    # the other ranks as a removal) while the other goes on to its length.
    capital, story = await answers(server.v1, [CAPITAL, STORY])
    assert "Paris" in capital
    three = await answers(ranks.server.v1, [STOPPED, STORY])
    assert three == [capital.split("France is")[0], story]


async def test_a_disconnect_mid_prefill_drops_the_sequence_on_every_rank(ranks, server):
    request_id = new_request_id("ranks-prefill")
    body = {"messages": [{"role": "user", "content": fresh(VERY_LONG_PROMPT)}], "max_tokens": 20}

    await stream_until(ranks.server, body, request_id, early_progress)
    await wait_slots_free(ranks.server, within_s=60)
    assert await logged_abort(ranks.server, request_id) == ("prefill", 0)
    # A rank still holding the sequence would run a batch of another shape than rank 0's,
    # and the next step would fail on every rank: the next requests are answered in step.
    (expected,) = await answers(server.v1, [CAPITAL])
    assert await answers(ranks.server.v1, [CAPITAL]) == [expected]


async def test_sigterm_to_rank_0_stops_every_rank(ranks):
    # Last of the module: it ends the group the tests above shared.
    pids = [ranks.pid(rank) for rank in range(3)]
    os.kill(pids[0], signal.SIGTERM)
    for pid in pids:
        ranks.wait_exit(pid, within_s=60)
    log = ranks.server.log_text()
    assert "rank 1: rank 0 stopped; exiting" in log
    assert "rank 2: rank 0 stopped; exiting" in log


async def _fail_mid_stream(group: RankGroup, act, within_s: float) -> tuple[list[dict], float]:
    """Stream a long answer, ``act()`` once its first words are out, and read on: the error
    objects the stream ended with, and how long after ``act`` rank 0 had exited."""
    rank0 = group.pid(0)
    text, errors = [], []
    acted_at = 0.0
    with trio.fail_after(within_s + 120):
        async with httpx.AsyncClient(timeout=within_s + 60) as client:
            async with client.stream(
                "POST",
                group.server.v1 + "/chat/completions",
                json={**chat("Tell me a long story.", max_tokens=400), "stream": True},
            ) as response:
                parser = SSEParser()
                try:
                    async for piece in response.aiter_text():
                        for event in parser.feed(piece):
                            _collect(event, text, errors)
                        if text and not acted_at:
                            act()
                            acted_at = time.monotonic()
                except httpx.HTTPError:
                    pass  # rank 0 left after its error frame: the connection may be cut
    assert acted_at, "the stream ended before anything was streamed"
    await trio.to_thread.run_sync(group.wait_exit, rank0, within_s)
    return errors, time.monotonic() - acted_at


@pytest.mark.parametrize(
    ("rank", "sig", "rank_timeout", "said"),
    [
        # Gone: the ring's sockets fail at once, long before the rank timeout.
        # (mlx.launch then sends SIGTERM to the others: rank 0 may see that first, and then
        # gives the ranks 5 s at most; either way the error names the rank group.)
        (2, signal.SIGKILL, "20", "rank group was lost"),
        # Still there but silent: only rank 0's watchdog can tell.
        (1, signal.SIGSTOP, "3", "--rank-timeout"),
    ],
    ids=["killed", "stalled"],
)
async def test_a_lost_rank_fails_the_requests_and_rank_0_exits(
    tmp_path, rank, sig, rank_timeout, said
):
    group = RankGroup(tmp_path, *GROUP_ARGS, "--rank-timeout", rank_timeout).start()
    try:
        victim = group.pid(rank)
        errors, took = await _fail_mid_stream(group, lambda: os.kill(victim, sig), within_s=30)
        assert errors and said in errors[0]["message"], errors
        assert took < 30
    finally:
        group.stop()
