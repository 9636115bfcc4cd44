"""A real trioserve process (Hypercorn, Trio worker) on 127.0.0.1 with the real model.

Starting, waiting and stopping live in ``trioserve.testing`` (shared with the tools); this
file holds the session's servers and the ``(name, data)`` view of SSE bodies the tests use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.replicas import Replicas
from trioserve.testing import ServerProcess, free_port, parse_events, serve_argv, start_server
from trioserve.testing import data_objects as data_objects  # re-exported for the tests


@pytest.fixture(scope="session")
def launch(tmp_path_factory, model_dir) -> Iterator:
    """``launch("--parallel", "2")``: a `trioserve serve` process, shared per argument list."""
    servers: dict[tuple[str, ...], ServerProcess] = {}

    def _launch(*args: str, env: dict | None = None) -> ServerProcess:
        key = args + tuple(sorted((env or {}).items()))
        if key not in servers:
            port = free_port()
            log_path = tmp_path_factory.mktemp("server") / "server.log"
            servers[key] = start_server(serve_argv(port, *args), port, log_path=log_path, env=env)
        return servers[key]

    yield _launch
    for server in servers.values():
        server.stop()


# The main server: two slots and small prefill chunks, so progress events are certain.
MAIN_ARGS = ("--parallel", "2", "--prefill-step-size", "16", "--heartbeat-interval", "0.5")


@pytest.fixture(scope="session")
def server(launch) -> ServerProcess:
    return launch(*MAIN_ARGS)


@pytest.fixture(scope="session")
def replica_pair(tmp_path_factory) -> Iterator[Replicas]:
    """Two replicas (tests/integration/replicas.py) for the load-balancer tests, started at
    their first use; the HAProxy and the nginx tests share them."""
    pair = Replicas(tmp_path_factory.mktemp("replicas"))
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def front(balancer):
    """The module's load balancer (its ``balancer`` fixture, e.g. HAProxy) with both replicas
    behind it up: an earlier test may have stopped or killed one."""
    balancer.ensure_up()
    return balancer


def parse_sse(raw: str) -> list[tuple[str | None, str]]:
    """An SSE body as ``(event name, data)`` pairs, e.g. ``(None, "[DONE]")``; comment
    blocks (heartbeats) are left out: ``trioserve.testing.parse_events`` has them."""
    return [(e.name, e.data) for e in parse_events(raw) if not e.is_comment]
