"""Two trioserve replicas behind HAProxy on loopback, run with deploy/haproxy.cfg itself (its
ports substituted, its health checks made faster).

- A conversation's session header (each of the four that OpenCode, Claude Code and Codex
  send) keeps it on one replica, whose prefix cache then serves the resent history.
- Sessions spread over both replicas; requests without a session go to the least busy one.
- SIGTERM to a replica mid-stream: the stream finishes, new requests go to the other one.
- ``kill -9`` of a replica: new requests go to the other one.
Not one client-visible error anywhere. The replicas and the checks shared with the nginx
variant (test_replicas_nginx.py) are in tests/integration/replicas.py.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import trio

from tests.integration.replicas import (
    CHAT,
    HEADERS,
    NAMES,
    ROOT,
    LoadBalancerTests,
    Replicas,
    Stream,
    body,
    chat,
    check_a_killed_replica_is_routed_around,
    find_tool,
    in_flight,
)
from trioserve.testing import ServerProcess, free_port

pytestmark = [pytest.mark.replicas, pytest.mark.timeout(300)]

CONFIG = ROOT / "deploy" / "haproxy.cfg"
STATE_WAIT_S = 20.0  # for HAProxy to see a replica go up or down (it checks every 200 ms)


def _haproxy() -> str:
    return find_tool("haproxy", (2, 6, 0))  # `balance hash <expression>`


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
    """HAProxy on ``front`` in front of the session's two replicas."""

    def __init__(self, pair: Replicas, tmp: Path, haproxy: str) -> None:
        self.pair = pair
        self.tmp = tmp
        self.haproxy = haproxy
        self.front = free_port()
        self.proxy: ServerProcess | None = None
        self.stats_socket = tmp / "haproxy.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.front}"

    def ensure_up(self) -> None:
        """Both replicas running and healthy, HAProxy running and seeing both UP."""
        self.pair.ensure_up()
        if self.proxy is None:
            config = self.tmp / "haproxy.cfg"
            config.write_text(haproxy_config(self.front, self.pair.ports, self.stats_socket))
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

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop(timeout_s=10)

    def logs(self) -> str:
        return self.pair.logs(self.proxy)

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


@pytest.fixture(scope="module")
def balancer(replica_pair, tmp_path_factory) -> Iterator[Cluster]:
    with closing(Cluster(replica_pair, tmp_path_factory.mktemp("haproxy"), _haproxy())) as cluster:
        yield cluster


class TestHAProxy(LoadBalancerTests):
    """Affinity by each header with the cache hit, sessions spread, the least busy replica."""


async def test_sigterm_drains_a_replica_while_the_other_takes_the_new_requests(front):
    pair = front.pair
    session = f"drain-{uuid.uuid4().hex[:12]}"
    # In flight throughout (100 tokens: seconds even on a fast machine), and ending by itself
    # well within the grace.
    stream = Stream(front.url, {"X-Session-Id": session}, max_tokens=100)
    hi = body([{"role": "user", "content": "Hi."}], 2)

    async def new_requests(client: httpx.AsyncClient, other: int) -> None:
        """The same session (hashed to the draining replica) and none: all to the other."""
        for headers in ({"X-Session-Id": session}, {}):
            answered = await trio.to_thread.run_sync(pair.answers, other)
            response = await client.post(front.url + CHAT, json=hi, headers=headers)
            assert response.status_code == 200, f"{response.text}\n{front.logs()}"
            assert await trio.to_thread.run_sync(pair.answers, other) == answered + 1

    with trio.fail_after(150):
        async with in_flight(pair, stream) as (client, draining):
            other = 1 - draining
            server = pair[draining]
            server.process.send_signal(signal.SIGTERM)
            # At once, before a health check can have seen it: refused, retried elsewhere.
            await new_requests(client, other)
            # HAProxy takes it out, and leaves its stream alone...
            await trio.to_thread.run_sync(
                front.wait_for_states, {NAMES[draining]: "DOWN", NAMES[other]: "UP"}
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


def test_a_killed_replica_is_routed_around(front):
    pair = front.pair
    other, session = check_a_killed_replica_is_routed_around(pair, front.url)
    front.wait_for_states({NAMES[1 - other]: "DOWN", NAMES[other]: "UP"})
    # And the session stays on the survivor while its replica is down.
    hello = [{"role": "user", "content": "Say hi."}]
    answered = pair.answers(other)
    chat(front.url, hello, {"X-Session-Id": session}, max_tokens=1)
    assert pair.answers(other) == answered + 1


def test_the_shipped_config_is_valid_on_its_own():
    result = subprocess.run(
        [_haproxy(), "-c", "-f", str(CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = CONFIG.read_text().lower()
    assert all(f"req.hdr({h.lower()})" in text for h in HEADERS)
