"""One real `trioserve serve --log-level debug` for the strict-client end-to-end tests.

The debug log holds each request's generated text under its ``chatcmpl-`` id, which is how
the tests tie what a client showed to what the server produced. The clients themselves come
from ``tools/setup_e2e.sh`` (run by ``tools/bootstrap.sh``); without them these tests fail,
they do not skip: CI must not pass without the strict clients.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
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
