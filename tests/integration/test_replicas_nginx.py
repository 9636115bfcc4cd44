"""Two trioserve replicas behind nginx on loopback, run with deploy/nginx.conf itself (its ports
substituted, its pid and temporary files in the test's own folder): the nginx variant of
test_replicas.py, on the same two replicas (the session's ``replica_pair``).

- A conversation's session header (each of the four) keeps it on one replica, whose prefix
  cache then serves the resent history.
- Sessions spread over both replicas; requests without a session go to the least busy one.
- ``kill -9`` of a replica: new requests go to the other one, at once.
Open-source nginx checks passively only (a replica is out once a request to it failed), so
there is no health state to wait for here: every request must simply succeed.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.integration.replicas import (
    HEADERS,
    ROOT,
    LoadBalancerTests,
    Replicas,
    check_a_killed_replica_is_routed_around,
    find_tool,
)
from trioserve.testing import ServerProcess, free_port

pytestmark = [pytest.mark.replicas, pytest.mark.timeout(300)]

CONFIG = ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _nginx() -> str:
    return find_tool("nginx", (1, 19, 5))  # `-e stderr`; hash consistent, zone are older


def nginx_config(tmp: Path, front: int | None = None, ports: list[int] | None = None) -> str:
    """deploy/nginx.conf with its temporary files in ``tmp`` (root's /var/lib/nginx is not
    everyone's to write), and with ``front`` and ``ports`` for its addresses when given."""
    text = CONFIG.read_text()
    local = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in TEMP_PATHS)
    substitutions = [("\nhttp {\n", "\nhttp {\n" + local)]
    if front is not None and ports is not None:
        substitutions += [
            ("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{front};"),
            ("127.0.0.1:8081", f"127.0.0.1:{ports[0]}"),
            ("127.0.0.1:8082", f"127.0.0.1:{ports[1]}"),
        ]
    for old, new in substitutions:
        assert old in text, f"deploy/nginx.conf no longer has {old!r}: update this test"
        text = text.replace(old, new)
    return text


def nginx_argv(nginx: str, config: Path, tmp: Path, *extra: str) -> list[str]:
    """nginx in the foreground with ``config``, its pid file in ``tmp``, errors on stderr. Its
    workers run as this user: started by root they would be `nobody`, who cannot write
    ``tmp`` (run by anyone else, nginx ignores the directive)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    main = f"daemon off; pid {tmp / 'nginx.pid'}; error_log stderr notice; user {user} {group};"
    return [nginx, "-p", str(tmp), "-e", "stderr", "-c", str(config), "-g", main, *extra]


class NginxFront:
    """nginx on ``front`` in front of the session's two replicas."""

    def __init__(self, pair: Replicas, tmp: Path, nginx: str) -> None:
        self.pair = pair
        self.tmp = tmp
        self.nginx = nginx
        self.front = free_port()
        self.proxy: ServerProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.front}"

    def ensure_up(self) -> None:
        """Both replicas healthy, and nginx running. A replica started again means a fresh
        nginx too, which knows nothing of the old one's failure."""
        if self.pair.ensure_up():
            self.close()
        if self.proxy is not None and self.proxy.process.poll() is None:
            return
        self.starts += 1
        config = self.tmp / "nginx.conf"
        config.write_text(nginx_config(self.tmp, self.front, self.pair.ports))
        argv = nginx_argv(self.nginx, config, self.tmp)
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = self.tmp / f"nginx-{self.starts}.log"
        self.proxy = ServerProcess(argv, self.front, log_path=log, name="nginx")
        self.proxy.start().wait_healthy(timeout_s=30)  # its /health is a replica's

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop(timeout_s=10)
            self.proxy = None


@pytest.fixture(scope="module")
def balancer(replica_pair, tmp_path_factory) -> Iterator[NginxFront]:
    with closing(NginxFront(replica_pair, tmp_path_factory.mktemp("nginx"), _nginx())) as front:
        yield front


class TestNginx(LoadBalancerTests):
    """Affinity by each header with the cache hit, sessions spread, the least busy replica."""


def test_a_killed_replica_is_routed_around(front):
    check_a_killed_replica_is_routed_around(front.pair, front.url)


def test_the_shipped_config_is_valid_on_its_own(tmp_path):
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config(tmp_path))  # its own addresses; only the files moved
    argv = nginx_argv(_nginx(), config, tmp_path, "-t")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    text = CONFIG.read_text().lower()
    assert all(f"$http_{h.lower().replace('-', '_')}" in text for h in HEADERS)
    assert "hash $trioserve_session consistent;" in text and "least_conn;" in text
