"""Two trioserve replicas on loopback, for the load-balancer tests (test_replicas.py runs them
behind HAProxy, test_replicas_nginx.py behind nginx): started (again) on demand, and shared by
both modules through the session's ``replica_pair`` fixture (tests/integration/conftest.py).

Which replica served a request is read from the replicas' own ``/metrics`` (their count of
200s on /v1/chat/completions), never from the load balancer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from trioserve.testing import ServerProcess, SSEParser, free_port, serve_argv

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
# The session headers of OpenCode (two), Claude Code and Codex, in the configs' order.
HEADERS = ["x-session-affinity", "X-Session-Id", "X-Claude-Code-Session-Id", "session-id"]
NAMES = ("replica1", "replica2")  # the server names in deploy/haproxy.cfg
# A grace long enough for the drained stream to end by itself, even on a slow, busy runner.
REPLICA_ARGS = ("--parallel", "2", "--no-ui", "--shutdown-grace", "120")
# Greedy, this prompt runs to max_tokens (tests/integration/test_shutdown.py).
NUMBERS = "Write the numbers from 1 to 500 on one line, separated by commas, with nothing else."


def find_tool(name: str, minimum: tuple[int, int, int], version_flag: str = "-v") -> str:
    """The ``name`` binary (on PATH, or in an sbin where Debian and Homebrew put it) at
    ``minimum`` or later; a skip with the reason where it cannot be had, and a failure on
    Linux under CI, where tools/setup_haproxy.sh must have installed it."""
    found = shutil.which(name) or next(
        (
            path
            for path in (
                f"/usr/sbin/{name}",
                f"/usr/local/sbin/{name}",
                f"/opt/homebrew/bin/{name}",
            )
            if os.access(path, os.X_OK)
        ),
        None,
    )
    wanted = ".".join(map(str, minimum))
    problem = None
    if found is None:
        problem = f"{name} is not installed (tools/setup_haproxy.sh installs it: apt-get or brew)"
    else:
        result = subprocess.run([found, version_flag], capture_output=True, text=True, timeout=30)
        said = result.stdout + result.stderr  # nginx says it on stderr
        match = re.search(r"version\D*?(\d+)\.(\d+)(?:\.(\d+))?", said)
        version = tuple(int(part or 0) for part in match.groups()) if match else None
        if version is None or version < minimum:
            problem = f"the replica tests need {name} {wanted} or later: {said[:80]!r}"
    if problem is None:
        return found
    if os.environ.get("CI") and sys.platform.startswith("linux"):
        pytest.fail(f"the replica tests cannot run in CI: {problem}")
    pytest.skip(problem)


class Replicas:
    """Two ``trioserve serve`` replicas, started (again) on demand by ``ensure_up``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = [free_port(), free_port()]
        self.servers: list[ServerProcess | None] = [None, None]
        self.starts = 0

    def __getitem__(self, i: int) -> ServerProcess:
        server = self.servers[i]
        assert server is not None, f"{NAMES[i]} was never started"
        return server

    def ensure_up(self) -> list[int]:
        """Both replicas running and healthy; returns those that had to be (re)started (an
        earlier test may have stopped or killed one)."""
        dead = [i for i, s in enumerate(self.servers) if s is None or s.process.poll() is not None]
        for i in dead:  # started together: they load the model side by side
            self.starts += 1
            log = self.tmp / f"{NAMES[i]}-{self.starts}.log"
            argv = serve_argv(self.ports[i], *REPLICA_ARGS)
            self.servers[i] = ServerProcess(argv, self.ports[i], log_path=log, name=NAMES[i])
            self.servers[i].start()
        for i in dead:
            self[i].wait_healthy()
        return dead

    def stop(self) -> None:
        for server in self.servers:
            if server is not None:
                server.stop(timeout_s=10)

    def answers(self, i: int) -> float:
        """Replica ``i``'s count of 200s on /v1/chat/completions, from its /metrics."""
        response = httpx.get(self[i].url + "/metrics", timeout=10, trust_env=False)
        response.raise_for_status()
        for line in response.text.splitlines():
            if (
                line.startswith("trioserve_requests_total{")
                and f'endpoint="{CHAT}"' in line
                and 'status="200"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def counts(self) -> list[float]:
        return [self.answers(0), self.answers(1)]

    def logs(self, *others: ServerProcess | None) -> str:
        """The end of each replica's log, and of ``others`` (the load balancer)."""
        parts = []
        for server in (*others, *self.servers):
            if server is not None:
                parts.append(f"--- {server.name} ---\n{server.log_tail(15)}")
        return "\n".join(parts)


def served_by(before: list[float], after: list[float], requests: int = 1) -> int:
    """The one replica whose 200 count grew by ``requests`` while the other's stayed."""
    grown = [after[i] - before[i] for i in range(2)]
    assert sorted(grown) == [0, requests], f"200s per replica grew by {grown}"
    return grown.index(requests)


def body(messages: list[dict], max_tokens: int, stream: bool = False) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def chat(url: str, messages: list[dict], headers: dict, max_tokens: int = 8) -> dict:
    """A chat request to the load balancer at ``url``; it must answer 200."""
    response = httpx.post(
        url + CHAT, json=body(messages, max_tokens), headers=headers, timeout=120, trust_env=False
    )
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return response.json()


def chat_on(
    pair: Replicas, url: str, messages: list[dict], headers: dict, max_tokens: int = 8
) -> tuple[int, dict]:
    """A chat request through the load balancer at ``url``, and which replica served it."""
    before = pair.counts()
    answer = chat(url, messages, headers, max_tokens)
    return served_by(before, pair.counts()), answer


def _has_content(chunk: dict) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


class Stream:
    """One streamed chat request through the load balancer at ``url``, read to its end in a
    task (see ``in_flight``)."""

    def __init__(self, url: str, headers: dict, max_tokens: int) -> None:
        self.body = body([{"role": "user", "content": NUMBERS}], max_tokens, stream=True)
        self.url = url + CHAT
        self.headers = headers
        self.decoding = trio.Event()  # its first token arrived
        self.done = trio.Event()
        self.status: int | None = None
        self.events: list = []
        self._scope = trio.CancelScope()

    async def run(self, client: httpx.AsyncClient) -> None:
        parser = SSEParser()
        try:
            with self._scope:
                async with client.stream(
                    "POST", self.url, json=self.body, headers=self.headers
                ) as response:
                    self.status = response.status_code
                    async for text in response.aiter_text():
                        for event in parser.feed(text):
                            if event.is_comment:
                                continue
                            self.events.append(event)
                            if not event.is_done and _has_content(event.json()):
                                self.decoding.set()
        finally:
            self.decoding.set()  # a stream that failed early must not leave a waiter hanging
            self.done.set()

    def hang_up(self) -> None:
        """The client goes away (the replica then frees the slot)."""
        self._scope.cancel()

    def check_finished_cleanly(self) -> None:
        assert self.status == 200
        assert self.events and self.events[-1].is_done, "no [DONE]"
        chunks = [e.json() for e in self.events[:-1]]
        assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
        assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


async def counts(pair: Replicas) -> list[float]:
    return await trio.to_thread.run_sync(pair.counts)


@asynccontextmanager
async def in_flight(pair: Replicas, stream: Stream) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """``stream`` started and decoding; yields a client for more requests and the replica
    that serves the stream. Leaving the block waits for the stream's end (``hang_up`` it
    first to end it at once)."""
    async with (
        httpx.AsyncClient(timeout=60, trust_env=False) as client,
        trio.open_nursery() as nursery,
    ):
        before = await counts(pair)
        nursery.start_soon(stream.run, client)
        await stream.decoding.wait()
        assert stream.status == 200 and not stream.done.is_set(), pair.logs()
        yield client, served_by(before, await counts(pair))


def check_a_killed_replica_is_routed_around(pair: Replicas, url: str) -> tuple[int, str]:
    """``kill -9`` of the replica a session is on: at once, new requests (that session's and
    sessionless ones) are answered by the other. Returns the survivor's index and the
    session."""
    session = f"kill-{uuid.uuid4().hex[:12]}"
    hello = [{"role": "user", "content": "Say hi."}]
    victim, _ = chat_on(pair, url, hello, {"X-Session-Id": session}, max_tokens=1)
    other = 1 - victim
    server = pair[victim]
    server.process.kill()
    server.process.wait(timeout=10)
    # Before the load balancer can have noticed: refused, retried on the other one.
    for n in range(4):
        headers = {"X-Session-Id": session} if n % 2 == 0 else {}
        answered = pair.answers(other)
        chat(url, hello, headers, max_tokens=1)
        assert pair.answers(other) == answered + 1
    return other, session


class LoadBalancerTests:
    """The tests every load balancer here passes. A module runs them with a ``Test<Name>``
    subclass and a module-scoped ``balancer`` fixture (its load balancer: ``pair``, ``url``
    and ``ensure_up()``); the ``front`` fixture (tests/integration/conftest.py) has it and
    both replicas up at each test's start."""

    @pytest.mark.parametrize("header", HEADERS)
    def test_a_conversation_stays_on_its_replica_whose_cache_serves_its_history(
        self, front, header
    ):
        session = f"{header.lower()}-{uuid.uuid4().hex[:12]}"
        headers = {header: session}
        messages = [
            {"role": "user", "content": f"Note {session}. Name three colours of the rainbow."},
        ]
        first_on, first = chat_on(front.pair, front.url, messages, headers)
        messages += [
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "Now name one more."},
        ]
        second_on, second = chat_on(front.pair, front.url, messages, headers)
        assert second_on == first_on
        # The whole first turn came from that replica's prefix cache.
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first["usage"]["prompt_tokens"] > 0, second["usage"]

    def test_sessions_spread_over_both_replicas_and_each_keeps_its_own(self, front):
        hello = [{"role": "user", "content": "Say hi."}]
        seen: dict[int, list[str]] = {}
        for n in range(24):  # fixed ids: the same hash, so the same outcome, on every run
            session = f"spread-{n}"
            on, _ = chat_on(front.pair, front.url, hello, {HEADERS[n % 4]: session}, 1)
            seen.setdefault(on, []).append(session)
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"24 sessions all went to {NAMES[next(iter(seen))]}"
        for on, sessions in seen.items():
            # The same id under another client's header: the same replica.
            for header in HEADERS:
                again, _ = chat_on(front.pair, front.url, hello, {header: sessions[0]}, 1)
                assert again == on, (header, sessions[0])

    async def test_requests_without_a_session_go_to_the_least_busy_replica(self, front):
        pair = front.pair
        stream = Stream(front.url, {}, max_tokens=2000)  # runs for longer than this test needs
        with trio.fail_after(120):
            async with in_flight(pair, stream) as (client, busy):
                for _ in range(3):
                    before = await counts(pair)
                    hi = body([{"role": "user", "content": "Hi."}], 2)
                    response = await client.post(front.url + CHAT, json=hi)
                    assert response.status_code == 200, response.text
                    assert served_by(before, await counts(pair)) == 1 - busy
                assert not stream.done.is_set(), "the stream ended early: nothing was busy"
                stream.hang_up()
