"""One real `trioserve serve --log-level debug` for the strict-client end-to-end tests, and
what the tests of the driver scripts (tools/e2e/*_run.py) share.

The debug log holds each request's generated text under its answer id (``chatcmpl-`` ...),
which is how the tests tie what a client showed to what the server produced. The clients
themselves come from ``tools/setup_e2e.sh`` (run by ``tools/bootstrap.sh``); without them these
tests fail, they do not skip: CI must not pass without the strict clients.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from trioserve.testing import ServerProcess, free_port, serve_argv, start_server

ROOT = Path(__file__).resolve().parents[2]
E2E_TOOLS = ROOT / "tools" / "e2e"
NODE_MODULES = E2E_TOOLS / "node_modules"

# Heartbeats every 0.5 s make progress events certain for opted-in streams.
E2E_SERVER_ARGS = ("--log-level", "debug", "--heartbeat-interval", "0.5")


def _load_tool(name: str):
    """A module of tools/e2e (not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location(f"trioserve_e2e_{name}", E2E_TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


serverlog = _load_tool("serverlog")
recorder = _load_tool("recorder")


def require_clients() -> None:
    """Fail with the fix when the pinned clients are not installed."""
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: install Node >= 18, then run tools/setup_e2e.sh")
    if not (NODE_MODULES / ".bin" / "opencode").exists() or not (NODE_MODULES / "ai").is_dir():
        pytest.fail(f"{NODE_MODULES} is not installed: run tools/setup_e2e.sh")


@pytest.fixture(scope="session")
def e2e_server(tmp_path_factory, model_dir) -> Iterator[ServerProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("e2e-server") / "server.log"
    server = start_server(serve_argv(port, *E2E_SERVER_ARGS), port, log_path=log_path)
    yield server
    server.stop()


def require_cli(path: Path) -> None:
    """Fail with the fix when one pinned CLI is not installed."""
    if not path.exists():
        pytest.fail(f"{path} is not installed: run tools/setup_e2e.sh")


def driver_server(start: Callable[[Path], ServerProcess], name: str):
    """A module-scoped fixture: the driver's own server (``start(folder)``), for the module."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory, model_dir) -> Iterator[ServerProcess]:
        server = start(tmp_path_factory.mktemp(name))
        yield server
        server.stop()

    return server


def run_driver(
    script: str, tmp_path: Path, *args: str, timeout_s: float, keys: Sequence[str]
) -> tuple[dict, str]:
    """tools/e2e/``script``'s JSON report for one run in ``tmp_path``, and the context to show
    when a check fails (the report's ``keys``)."""
    argv = [sys.executable, str(E2E_TOOLS / script), *args]
    argv += ["--scratch", str(tmp_path), "--timeout", str(timeout_s)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 60)
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    context = json.dumps({k: report[k] for k in keys}, indent=1)[-12000:]
    assert not report["timed_out"], context
    return report, context


def live(server: ServerProcess) -> tuple[str, ...]:
    """A driver's options for a running server."""
    return ("--server", server.url, "--server-log", str(server.log_path))


def assert_printed_the_last_answer(report: dict, context: str) -> None:
    """The text the server logged for the last request is what the client printed."""
    final = report["requests"][-1]
    text = final["logged_text"]
    assert text is not None and text.strip(), context
    assert serverlog.normalized(text) in serverlog.normalized(report["stdout"]), context


def assert_progress_as_asked(request: dict, mode: str, context: str) -> None:
    """A ``progress`` run's request opted in and its stream held progress events; any other
    mode's did neither."""
    if mode == "progress":
        assert request["progress_header"] == "true", context
        assert request["progress_events"] >= 1, context
    else:
        assert request["progress_header"] is None, context
        assert request["progress_events"] == 0, context
