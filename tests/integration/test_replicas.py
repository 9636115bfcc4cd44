"""Two trioserve replicas behind HAProxy on loopback, run with deploy/haproxy.cfg itself (its
ports substituted, its health checks made faster).

- A conversation's session header (each of the four that OpenCode, Claude Code and Codex
  send) keeps it on one replica, whose prefix cache then serves the resent history.
- Sessions spread over both replicas; requests without a session go to the least busy one.
- SIGTERM to a replica mid-stream: the stream finishes, new requests go to the other one.
- ``kill -9`` of a replica: new requests go to the other one.
Not one client-visible error anywhere. Which replica served a request is read from the
replicas' own ``/metrics`` (their count of 200s on /v1/chat/completions), never from HAProxy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from trioserve.testing import ServerProcess, SSEParser, free_port, serve_argv

pytestmark = [pytest.mark.replicas, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
CHAT = "/v1/chat/completions"
HEADERS = ["x-session-affinity", "X-Session-Id", "X-Claude-Code-Session-Id", "session-id"]
NAMES = ("replica1", "replica2")  # the server names in deploy/haproxy.cfg
# A grace long enough for the drained stream to end by itself, even on a slow, busy runner.
REPLICA_ARGS = ("--parallel", "2", "--no-ui", "--shutdown-grace", "120")
STATE_WAIT_S = 20.0  # for HAProxy to see a replica go up or down (it checks every 200 ms)
# Greedy, this prompt runs to max_tokens (tests/integration/test_shutdown.py).
NUMBERS = "Write the numbers from 1 to 500 on one line, separated by commas, with nothing else."


def _haproxy() -> str:
    """The haproxy binary; a skip with the reason where it cannot be had (a failure on Linux
    under CI, where tools/setup_haproxy.sh must have installed it)."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    problem = None
    if found is None:
        problem = "haproxy is not installed (tools/setup_haproxy.sh installs it: apt-get or brew)"
    else:
        version = subprocess.run([found, "-v"], capture_output=True, text=True, timeout=30)
        match = re.search(r"version (\d+)\.(\d+)", version.stdout)
        if match is None or (int(match[1]), int(match[2])) < (2, 6):
            problem = f"deploy/haproxy.cfg needs HAProxy 2.6 or later: {version.stdout[:80]!r}"
    if problem is None:
        return found
    if os.environ.get("CI") and sys.platform.startswith("linux"):
        pytest.fail(f"the replica tests cannot run in CI: {problem}")
    pytest.skip(problem)


def haproxy_config(front: int, ports: list[int], stats_socket: Path) -> str:
    """deploy/haproxy.cfg for this test: its ports, a stats socket, checks every 200 ms."""
    text = CONFIG.read_text()
    substitutions = [
        ("\nglobal\n", f"\nglobal\n    stats socket {stats_socket} level admin\n"),
        ("bind 127.0.0.1:8080", f"bind 127.0.0.1:{front}"),
        ("127.0.0.1:8081", f"127.0.0.1:{ports[0]}"),
        ("127.0.0.1:8082", f"127.0.0.1:{ports[1]}"),
        ("inter 1s fall 1 rise 2", "inter 200ms fall 1 rise 1"),
    ]
    for old, new in substitutions:
        assert old in text, f"deploy/haproxy.cfg no longer has {old!r}: update this test"
        text = text.replace(old, new)
    return text


class Cluster:
    """HAProxy on ``front`` and two replicas, started (again) on demand by ``ensure_up``."""

    def __init__(self, tmp: Path, haproxy: str) -> None:
        self.tmp = tmp
        self.haproxy = haproxy
        self.front = free_port()
        self.ports = [free_port(), free_port()]
        self.replicas: list[ServerProcess | None] = [None, None]
        self.proxy: ServerProcess | None = None
        self.stats_socket = tmp / "haproxy.sock"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.front}"

    def replica(self, i: int) -> ServerProcess:
        server = self.replicas[i]
        assert server is not None
        return server

    def ensure_up(self) -> None:
        """Both replicas running and healthy, HAProxy running and seeing both UP."""
        dead = [i for i, r in enumerate(self.replicas) if r is None or r.process.poll() is not None]
        for i in dead:  # started together: they load the model side by side
            self.starts += 1
            log = self.tmp / f"{NAMES[i]}-{self.starts}.log"
            argv = serve_argv(self.ports[i], *REPLICA_ARGS)
            server = ServerProcess(argv, self.ports[i], log_path=log, name=NAMES[i])
            self.replicas[i] = server.start()
        for i in dead:
            self.replica(i).wait_healthy()
        if self.proxy is None:
            config = self.tmp / "haproxy.cfg"
            config.write_text(haproxy_config(self.front, self.ports, self.stats_socket))
            check = subprocess.run(
                [self.haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
            )
            assert check.returncode == 0, check.stdout + check.stderr
            # -db: in the foreground, logging to stdout; its /health is a replica's.
            argv = [self.haproxy, "-db", "-f", str(config)]
            log = self.tmp / "haproxy.log"
            self.proxy = ServerProcess(argv, self.front, log_path=log, name="haproxy")
            self.proxy.start().wait_healthy(timeout_s=30)
        self.wait_for_states({"replica1": "UP", "replica2": "UP"})

    def stop(self) -> None:
        for server in (self.proxy, *self.replicas):
            if server is not None:
                server.stop(timeout_s=10)

    # -- what HAProxy sees --

    def states(self) -> dict[str, str]:
        """The check state of each server of the by_session backend (``show stat``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        lines = data.decode().splitlines()
        columns = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "by_session"}

    def wait_for_states(self, expected: dict[str, str], within_s: float = STATE_WAIT_S) -> None:
        deadline = time.monotonic() + within_s
        while True:
            states = self.states()
            if all(states.get(name) == state for name, state in expected.items()):
                return
            assert time.monotonic() < deadline, f"HAProxy sees {states}, not {expected}"
            time.sleep(0.1)

    # -- who served what --

    def answers(self, i: int) -> float:
        """Replica ``i``'s count of 200s on /v1/chat/completions, from its /metrics."""
        response = httpx.get(self.replica(i).url + "/metrics", timeout=10, trust_env=False)
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

    def logs(self) -> str:
        parts = []
        for server in (self.proxy, *self.replicas):
            if server is not None:
                parts.append(f"--- {server.name} ---\n{server.log_tail(15)}")
        return "\n".join(parts)


def served_by(before: list[float], after: list[float], requests: int = 1) -> int:
    """The one replica whose 200 count grew by ``requests`` while the other's stayed."""
    grown = [after[i] - before[i] for i in range(2)]
    assert sorted(grown) == [0, requests], f"200s per replica grew by {grown}"
    return grown.index(requests)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("replicas"), _haproxy())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(replicas: Cluster) -> Cluster:
    replicas.ensure_up()  # an earlier test may have stopped or killed one
    return replicas


def _body(messages: list[dict], max_tokens: int, stream: bool = False) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def chat(cluster: Cluster, messages: list[dict], headers: dict, max_tokens: int = 8) -> dict:
    response = httpx.post(
        cluster.url + CHAT,
        json=_body(messages, max_tokens),
        headers=headers,
        timeout=120,
        trust_env=False,
    )
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return response.json()


def chat_on(
    cluster: Cluster, messages: list[dict], headers: dict, max_tokens: int = 8
) -> tuple[int, dict]:
    """A request through HAProxy, and which replica served it."""
    before = cluster.counts()
    answer = chat(cluster, messages, headers, max_tokens)
    return served_by(before, cluster.counts()), answer


@pytest.mark.parametrize("header", HEADERS)
def test_a_conversation_stays_on_its_replica_whose_cache_serves_its_history(cluster, header):
    session = f"{header.lower()}-{uuid.uuid4().hex[:12]}"
    headers = {header: session}
    messages = [
        {"role": "user", "content": f"Note {session}. Name three colours of the rainbow."},
    ]
    first_on, first = chat_on(cluster, messages, headers)
    messages += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Now name one more."},
    ]
    second_on, second = chat_on(cluster, messages, headers)
    assert second_on == first_on
    # The whole first turn came from that replica's prefix cache.
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] > 0, second["usage"]


def test_sessions_spread_over_both_replicas_and_each_keeps_its_own(cluster):
    hello = [{"role": "user", "content": "Say hi."}]
    seen: dict[int, list[str]] = {}
    for n in range(24):  # fixed ids: the same hash, so the same outcome, on every run
        session = f"spread-{n}"
        on, _ = chat_on(cluster, hello, {HEADERS[n % 4]: session}, max_tokens=1)
        seen.setdefault(on, []).append(session)
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"24 sessions all went to {NAMES[next(iter(seen))]}"
    for on, sessions in seen.items():
        # The same id under another client's header: the same replica.
        for header in HEADERS:
            again, _ = chat_on(cluster, hello, {header: sessions[0]}, max_tokens=1)
            assert again == on, (header, sessions[0])


def _has_content(chunk: dict) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


class Stream:
    """One streamed chat request through HAProxy, read to its end in a task."""

    def __init__(self, cluster: Cluster, headers: dict, max_tokens: int) -> None:
        self.body = _body([{"role": "user", "content": NUMBERS}], max_tokens, stream=True)
        self.url = cluster.url + CHAT
        self.headers = headers
        self.decoding = trio.Event()  # its first token arrived
        self.done = trio.Event()
        self.status: int | None = None
        self.events: list = []

    async def run(self, client: httpx.AsyncClient) -> None:
        parser = SSEParser()
        try:
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

    def check_finished_cleanly(self) -> None:
        assert self.status == 200
        assert self.events and self.events[-1].is_done, "no [DONE]"
        chunks = [e.json() for e in self.events[:-1]]
        assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
        assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


async def _counts(cluster: Cluster) -> list[float]:
    return await trio.to_thread.run_sync(cluster.counts)


async def test_requests_without_a_session_go_to_the_least_busy_replica(cluster):
    stream = Stream(cluster, {}, max_tokens=2000)  # runs for longer than this test needs
    with trio.fail_after(120):
        async with (
            httpx.AsyncClient(timeout=60, trust_env=False) as client,
            trio.open_nursery() as nursery,
        ):
            before = await _counts(cluster)
            nursery.start_soon(stream.run, client)
            await stream.decoding.wait()
            assert stream.status == 200 and not stream.done.is_set(), cluster.logs()
            busy = served_by(before, await _counts(cluster))
            for _ in range(3):
                before = await _counts(cluster)
                response = await client.post(
                    cluster.url + CHAT, json=_body([{"role": "user", "content": "Hi."}], 2)
                )
                assert response.status_code == 200, response.text
                assert served_by(before, await _counts(cluster)) == 1 - busy
            assert not stream.done.is_set(), "the stream ended early: nothing was busy"
            nursery.cancel_scope.cancel()  # the client goes away; the replica frees the slot


async def test_sigterm_drains_a_replica_while_the_other_takes_the_new_requests(cluster):
    session = f"drain-{uuid.uuid4().hex[:12]}"
    # In flight throughout (100 tokens: seconds even on a fast machine), and ending by itself
    # well within the grace.
    stream = Stream(cluster, {"X-Session-Id": session}, max_tokens=100)
    hi = _body([{"role": "user", "content": "Hi."}], 2)

    async def new_requests(client: httpx.AsyncClient, other: int) -> None:
        """The same session (hashed to the draining replica) and none: all to the other."""
        for headers in ({"X-Session-Id": session}, {}):
            answered = await trio.to_thread.run_sync(cluster.answers, other)
            response = await client.post(cluster.url + CHAT, json=hi, headers=headers)
            assert response.status_code == 200, f"{response.text}\n{cluster.logs()}"
            assert await trio.to_thread.run_sync(cluster.answers, other) == answered + 1

    with trio.fail_after(150):
        async with (
            httpx.AsyncClient(timeout=60, trust_env=False) as client,
            trio.open_nursery() as nursery,
        ):
            before = await _counts(cluster)
            nursery.start_soon(stream.run, client)
            await stream.decoding.wait()
            assert stream.status == 200 and not stream.done.is_set(), cluster.logs()
            draining = served_by(before, await _counts(cluster))
            other = 1 - draining
            server = cluster.replica(draining)
            server.process.send_signal(signal.SIGTERM)
            # At once, before a health check can have seen it: refused, retried elsewhere.
            await new_requests(client, other)
            # HAProxy takes it out, and leaves its stream alone...
            await trio.to_thread.run_sync(
                cluster.wait_for_states, {NAMES[draining]: "DOWN", NAMES[other]: "UP"}
            )
            streaming_when_down = not stream.done.is_set()
            await new_requests(client, other)  # ...and sends nothing more its way
    assert streaming_when_down, "the stream ended before the drain was seen: nothing in flight"
    stream.check_finished_cleanly()
    code = await trio.to_thread.run_sync(lambda: server.process.wait(timeout=40))
    log = server.log_text()
    assert code == 0, log[-2000:]
    assert "received SIGTERM" in log and "Traceback" not in log, log[-2000:]
    assert "grace period over" not in log, "the stream was cut, not finished"


def test_a_killed_replica_is_routed_around(cluster):
    session = f"kill-{uuid.uuid4().hex[:12]}"
    hello = [{"role": "user", "content": "Say hi."}]
    victim, _ = chat_on(cluster, hello, {"X-Session-Id": session}, max_tokens=1)
    other = 1 - victim
    server = cluster.replica(victim)
    server.process.kill()
    server.process.wait(timeout=10)
    # At once, before a health check can have seen it: refused, retried on the other one.
    for n in range(4):
        headers = {"X-Session-Id": session} if n % 2 == 0 else {}
        answered = cluster.answers(other)
        chat(cluster, hello, headers, max_tokens=1)
        assert cluster.answers(other) == answered + 1
    cluster.wait_for_states({NAMES[victim]: "DOWN", NAMES[other]: "UP"})
    # And the session stays on the survivor while its replica is down.
    answered = cluster.answers(other)
    chat(cluster, hello, {"X-Session-Id": session}, max_tokens=1)
    assert cluster.answers(other) == answered + 1


def test_the_shipped_config_is_valid_on_its_own():
    result = subprocess.run(
        [_haproxy(), "-c", "-f", str(CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = CONFIG.read_text().lower()
    assert all(f"req.hdr({h.lower()})" in text for h in HEADERS)
