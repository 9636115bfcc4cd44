"""One model over three ranks: ``mlx.launch --backend ring -n 3`` running ``trioserve serve``
on loopback, for tests/integration/test_ranks.py and tools/bench_ranks.py.

The launcher is the ``ServerProcess`` (rank 0 answers HTTP on ``port``); the ranks are its
grandchildren (bash, then Python), found by the ``MLX_RANK`` mlx.launch sets in each.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from trioserve.testing.server import ServerProcess, free_port

RANKS = 3  # SmolLM2-135M: 9 attention heads and 3 KV heads split over 1 or 3 ranks only
STARTUP_TIMEOUT_S = 240.0  # three processes load the model on two cores


def launcher_argv(ring_port: int) -> list[str]:
    """``mlx.launch`` for RANKS ranks on loopback, ring ports from ``ring_port`` on, with
    this interpreter; the program and its arguments follow."""
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "mlx.launch"),
        "--backend",
        "ring",
        "-n",
        str(RANKS),
        "--starting-port",
        str(ring_port),
        "--python",
        sys.executable,
    ]


def launch_argv(port: int, ring_port: int, *serve_args: str) -> list[str]:
    """``trioserve serve --port PORT`` on RANKS ranks."""
    trioserve = str(Path(sys.executable).parent / "trioserve")
    return [*launcher_argv(ring_port), trioserve, "serve", "--port", str(port), *serve_args]


def free_ring_ports() -> int:
    """A base port with the next RANKS - 1 ports free too (mlx.launch counts up from it)."""
    for _ in range(50):
        base = free_port()
        if all(_port_free(base + i) for i in range(1, RANKS)):
            return base
    raise RuntimeError("no run of free loopback ports for the ring")


class RankGroup:
    """Three ranks of one ``trioserve serve``, rank 0 on ``self.server.port``."""

    def __init__(self, log_dir: Path, *serve_args: str, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.server = ServerProcess(
            launch_argv(port, free_ring_ports(), *serve_args),
            port,
            log_path=log_dir / f"ranks-{port}.log",
            env=env,  # mlx.launch passes its environment on to every rank
            name="3 ranks",
            die_with_parent=True,
        )

    def start(self) -> RankGroup:
        self.server.start()
        self.server.wait_healthy(STARTUP_TIMEOUT_S)
        _lower_priority(self.server.pid)
        return self

    def pid(self, rank: int) -> int:
        """The Python process of ``rank``."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                f"MLX_RANK={rank}".encode() in environ
                and str(self.server.port).encode() in cmdline
                and any(part.endswith(b"python") or b"python3" in part for part in cmdline[:1])
            ):
                return int(entry.name)
        raise LookupError(f"no process of rank {rank} for port {self.server.port}")

    def alive(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    def wait_exit(self, pid: int, within_s: float) -> float:
        """Seconds until ``pid`` is gone; fails after ``within_s``."""
        started = time.monotonic()
        while self.alive(pid):
            if time.monotonic() - started > within_s:
                raise TimeoutError(f"pid {pid} still running after {within_s:g} s")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self) -> None:
        """Whatever state it is in: rank 0 first (it tells the others), then anything left."""
        pids = []
        for rank in range(RANKS):
            try:
                pids.append(self.pid(rank))
            except LookupError:
                pass
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                _signal(pid, sig)
        deadline = time.monotonic() + 30
        while any(self.alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        self.server.stop(timeout_s=10)


def _lower_priority(pid: int) -> None:
    """mlx.launch (0.32) polls its children's pipes without pause, one thread per rank
    (their stdin is always writable), which takes about half a core from the ranks on a
    2-core machine. Its threads get the lowest priority; the ranks, started before, keep
    theirs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), 19)
        except OSError:
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
