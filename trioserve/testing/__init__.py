"""Helpers for testing trioserve and for driving it from tools, like ``trio.testing``.

Two halves, shared by ``tests/`` and ``tools/`` so there is one copy of each:

- :mod:`trioserve.testing.server`: a free port, a real server process (``trioserve serve``,
  a Hypercorn factory launch, or a peer server), a start-up wait on ``/health`` with a
  deadline, and a stop that terminates, waits and kills.
- :mod:`trioserve.testing.sse`: one parser for server-sent events, for a whole body or a
  stream read as it arrives.

Only the standard library is used: importing this needs no test extras.
"""

from trioserve.testing.server import (
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServerError,
    ServerProcess,
    free_port,
    hypercorn_argv,
    running_server,
    serve_argv,
    start_server,
)
from trioserve.testing.sse import DONE, Event, SSEParser, data_objects, iter_events, parse_events

__all__ = [
    "DONE",
    "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "Event",
    "SSEParser",
    "ServerError",
    "ServerProcess",
    "data_objects",
    "free_port",
    "hypercorn_argv",
    "iter_events",
    "parse_events",
    "running_server",
    "serve_argv",
    "start_server",
]
