"""Real server processes for the tests and the tools: a free port, start, wait, stop.

A :class:`ServerProcess` is one child process that serves HTTP on ``127.0.0.1:<port>``:
``python -m trioserve serve`` (see :func:`serve_argv`), a Hypercorn factory launch, or a peer
server for a benchmark. Its output goes to a log file when one is given, so a failed start
raises :class:`ServerError` with the end of that log in the message.

Every wait has a deadline: the start-up waits for ``GET /health`` to answer 200 for at most
``timeout_s``, and :meth:`ServerProcess.stop` sends SIGTERM (the server's graceful shutdown),
waits, then kills. Only the standard library is used, so importing this needs no test extras::

    with running_server("--parallel", "2", log_path=tmp / "server.log") as server:
        httpx.post(server.v1 + "/chat/completions", json=body)

    port = free_port()
    argv = [sys.executable, "-m", "hypercorn", "--worker-class", "trio",
            "--bind", f"127.0.0.1:{port}", "trioserve.app:create_app()"]
    server = start_server(argv, port, log_path=log, env={"TRIOSERVE_PARALLEL": "3"})
    try:
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HOST",
    "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ServerError",
    "ServerProcess",
    "free_port",
    "running_server",
    "serve_argv",
    "start_server",
]

HOST = "127.0.0.1"
#: A cold start loads (and on first use converts) the model: minutes on a slow runner.
STARTUP_TIMEOUT_S = 180.0
#: From SIGTERM to SIGKILL; the server's own ``--shutdown-grace`` is shorter by default.
STOP_TIMEOUT_S = 20.0
_POLL_S = 0.2

# Loopback needs no proxy, whatever HTTP_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server exited during start-up or did not become healthy in time.

    The message ends with the tail of the server's log, when it has one.
    """


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_argv(port: int, *args: str) -> list[str]:
    """``python -m trioserve serve --port PORT ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "trioserve", "serve", "--port", str(port), *args]


def hypercorn_argv(port: int, factory: str = "trioserve.app:create_app()") -> list[str]:
    """``python -m hypercorn --worker-class trio --bind 127.0.0.1:PORT FACTORY``: the
    documented launch without ``trioserve serve`` (configured by ``TRIOSERVE_*``)."""
    bind = f"{HOST}:{port}"
    return [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--bind", bind, factory]


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux only: a ``preexec_fn`` that makes the kernel SIGTERM the child when its parent
    dies, even by SIGKILL. Resolved here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_signal


class ServerProcess:
    """One server process on ``127.0.0.1:port``.

    Args:
        argv: the command line; it must make the server listen on ``port``.
        port: where it listens.
        log_path: where its stdout and stderr go (overwritten); ``None`` leaves them on this
            process's own.
        env: variables set on top of this process's environment.
        cwd: its working directory.
        name: for messages ("trioserve", "peer").
        new_session: start it in a session of its own, so a Ctrl-C in the terminal reaches
            only the driver, which then stops the server itself.
        die_with_parent: on Linux, the kernel sends it SIGTERM if this process dies without
            stopping it (a driver killed by a timeout). Runs code between fork and exec: for
            drivers that start servers from their main thread.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        name: str = "server",
        new_session: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.name = name
        self.new_session = new_session
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} {self.url} pid={self.process and self.process.pid}>"

    # -- where it is --

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    # -- its life --

    def start(self) -> ServerProcess:
        """Start the process; does not wait for it (see :meth:`wait_healthy`)."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} was started already")
        with contextlib.ExitStack() as stack:
            output = None
            if self.log_path is not None:
                output = stack.enter_context(open(self.log_path, "wb"))  # noqa: SIM115
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=self.new_session,
                preexec_fn=_parent_death_signal() if self.die_with_parent else None,
            )
        return self  # the child holds the log open; this process needs no handle

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``GET /health`` until it answers 200.

        Raises:
            ServerError: if the process exits first, or ``timeout_s`` passes; with the log tail.
        """
        process = self.process
        if process is None:
            raise RuntimeError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with code {process.returncode} during start-up"
                    + self._log_note()
                )
            if self._answers_health(min(2.0, max(deadline - time.monotonic(), 0.1))):
                return
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"{self.name} was not healthy within {timeout_s:g} s on {self.url}"
                    + self._log_note()
                )
            time.sleep(_POLL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code (``None``
        if it never started); calling it again is harmless.

        Raises:
            subprocess.TimeoutExpired: if even SIGKILL did not end it within ``timeout_s``.
        """
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        return process.returncode

    def __enter__(self) -> ServerProcess:
        if self.process is None:
            self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop(timeout_s=5)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what it says --

    def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The JSON body of ``GET /health``, whatever the status (a draining server's 503
        has a body too)."""
        try:
            with _OPENER.open(self.url + "/health", timeout=timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                return json.load(exc)

    def log_text(self) -> str:
        """Everything in the log so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _answers_health(self, timeout_s: float) -> bool:
        try:
            with _OPENER.open(self.url + "/health", timeout=timeout_s) as response:
                return response.status == 200
        except (OSError, http.client.HTTPException):  # refused, reset, timed out, 503, ...
            return False

    def _log_note(self) -> str:
        if self.log_path is None:
            return " (its output went to this process's stdout and stderr)"
        return f"\n--- the end of {self.log_path} ---\n{self.log_tail()}"


def start_server(
    argv: Sequence[str], port: int, *, timeout_s: float = STARTUP_TIMEOUT_S, **options: Any
) -> ServerProcess:
    """Start a :class:`ServerProcess` (``options`` are its keyword arguments) and wait until
    it is healthy. The caller stops it. On a failed start it is stopped, and
    :class:`ServerError` raised."""
    server = ServerProcess(argv, port, **options).start()
    try:
        server.wait_healthy(timeout_s)
    except BaseException:
        server.stop(timeout_s=5)
        raise
    return server


@contextlib.contextmanager
def running_server(
    *args: str, timeout_s: float = STARTUP_TIMEOUT_S, **options: Any
) -> Iterator[ServerProcess]:
    """``trioserve serve ARGS...`` on a free port for the ``with`` block, healthy on entry,
    stopped on the way out (error or Ctrl-C included). ``options`` go to
    :class:`ServerProcess`."""
    port = free_port()
    server = start_server(serve_argv(port, *args), port, timeout_s=timeout_s, **options)
    try:
        yield server
    finally:
        server.stop()
