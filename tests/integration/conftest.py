"""A real trioserve process (Hypercorn, Trio worker) on 127.0.0.1 with the real model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy in time:\n{log_path.read_text()[-3000:]}")


def start_process(
    argv: list[str], port: int, log_path: Path, env: dict | None = None
) -> LiveServer:
    log_file = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
    except Exception:
        process.kill()
        raise
    return LiveServer(url, process, log_path)


def stop_process(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def launch(tmp_path_factory, model_dir) -> Iterator:
    """``launch("--parallel", "2")``: a `trioserve serve` process, shared per argument list."""
    servers: dict[tuple[str, ...], LiveServer] = {}

    def _launch(*args: str, env: dict | None = None) -> LiveServer:
        key = args + tuple(sorted((env or {}).items()))
        if key not in servers:
            port = free_port()
            log_path = tmp_path_factory.mktemp("server") / "server.log"
            argv = [sys.executable, "-m", "trioserve", "serve", "--port", str(port), *args]
            servers[key] = start_process(argv, port, log_path, env)
        return servers[key]

    yield _launch
    for server in servers.values():
        stop_process(server)


# The main server: two slots and small prefill chunks, so progress events are certain.
MAIN_ARGS = ("--parallel", "2", "--prefill-step-size", "16", "--heartbeat-interval", "0.5")


@pytest.fixture(scope="session")
def server(launch) -> LiveServer:
    return launch(*MAIN_ARGS)


def parse_sse(raw: str) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event name, data) pairs; comment lines are returned as
    ("comment", text)."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(("comment", line[1:].strip()))
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        if data:
            events.append((name, "\n".join(data)))
    return events


def data_objects(raw: str) -> list[dict]:
    """Every data payload but [DONE], parsed."""
    return [json.loads(d) for n, d in parse_sse(raw) if n != "comment" and d != "[DONE]"]
