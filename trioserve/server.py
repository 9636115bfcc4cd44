"""``trioserve serve``: Hypercorn's Trio worker, in-process, around ``create_app``.

Scope tree: ``trio.run`` → ``serve`` nursery → ``_hypercorn_serve`` (its lifespan nursery owns
the model pool and its engines; each connection owns its requests). The first SIGINT/SIGTERM
starts a graceful shutdown; a second one exits at once. With one model, an engine that dies
also shuts the server down, with exit status 1; with several, that model is marked failed and
the others go on (``api.app.create_app``). Every accepted connection has a write deadline
(``trioserve.net``), so a client that stops reading can neither pin its connection nor hold up
the shutdown.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import ShutdownError, raise_shutdown, wrap_app

from trioserve.config import ServerConfig
from trioserve.drain import Drain
from trioserve.net import WriteDeadlineListener

if TYPE_CHECKING:
    from trioserve.engine.scheduler import WorkerFactory

log = logging.getLogger("trioserve")


def hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    hc.worker_class = "trio"
    hc.accesslog = None
    # Our own drain ends every request shutdown_grace_s after the signal, with an error
    # chunk; Hypercorn only cuts what is still open a little later.
    hc.graceful_timeout = config.shutdown_grace_s + 5.0
    # Long prompts can keep a client waiting; never drop a quiet but live connection.
    hc.keep_alive_timeout = 75.0
    return hc


def run_server(config: ServerConfig, worker_factory: WorkerFactory | None = None) -> int:
    """Serve until SIGINT/SIGTERM, or until the engine fails; return the exit status (0, or 1
    after an engine failure). ``worker_factory`` replaces the MLX worker (fault tests)."""
    return trio.run(_serve, config, worker_factory)


async def _serve(config: ServerConfig, worker_factory: WorkerFactory | None = None) -> int:
    from trioserve.api.app import create_app

    stop = trio.Event()
    failure: list[str] = []

    def on_engine_failure(message: str) -> None:
        failure.append(message)
        stop.set()

    app = create_app(config, on_engine_failure=on_engine_failure, worker_factory=worker_factory)
    state = app.extensions["trioserve"]
    log.info(
        "trioserve on http://%s:%d/v1 serving %s (%d slot(s)%s)",
        config.host,
        config.port,
        ", ".join(state.models.names()),
        config.parallel,
        f" each, at most {config.max_loaded_models} loaded" if state.models.several else "",
    )
    if not _is_loopback(config.host) and not config.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this address can use "
            "the model",
            config.host,
        )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, stop, state.drain)
        hc = hypercorn_config(config)
        await _hypercorn_serve(
            wrap_app(shield_response_end(app), hc.wsgi_max_body_size, None),
            hc,
            listeners(hc, config.send_timeout_s),
            shutdown_trigger=stop.wait,
        )
        nursery.cancel_scope.cancel()
    if failure:
        log.error("exiting: %s", failure[0])
        return 1
    log.info("stopped")
    return 0


def shield_response_end(asgi_app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Send each response's last body message shielded from cancellation.

    Quart-Trio runs a request as two tasks, the handler and a reader of ASGI messages, and
    cancels both once either ends. Hypercorn answers the last body message with
    ``http.disconnect`` and, in the same ``send`` call, re-arms the connection's keep-alive
    timer, which then meets that cancellation: the timer never starts, so an idle keep-alive
    connection neither times out nor closes at shutdown, and every SIGTERM waited out the
    whole grace period for it (seen: 15 s to stop an idle server a client had used). The
    write itself is already shielded by Hypercorn and bounded by ``--send-timeout``."""

    async def app(scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return

        async def send_end_shielded(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await asgi_app(scope, receive, send_end_shielded)

    return app


class _Connection(TCPServer):
    """Hypercorn's connection, whose keep-alive timer ends with the connection.

    Hypercorn leaves the timer running once the client has closed: the connection's task
    then lingers until ``keep_alive_timeout`` (75 s here) for nothing. Unseen before
    ``shield_response_end``, as the timer never started; seen after it by tools/stress.py's
    task count (31 -> 37 after a storm)."""

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()


# Kernel send buffer per connection. Linux autotunes it up to megabytes, which a client that
# keeps its socket open but reads nothing soaks up for minutes before any backpressure reaches
# the stream (seen: 1851 frames of ~3 KB in 14 s). Capped, a stalled reader blocks the stream
# after ~100 KB and --send-timeout can drop it. SSE writes are small, so this costs nothing.
SEND_BUFFER_BYTES = 64 * 1024


def served_sockets(hc: HypercornConfig) -> Sockets:
    """Hypercorn's listening sockets, with SO_SNDBUF capped (above); accepted connections
    inherit it.

    There is no ``TCP_USER_TIMEOUT`` any more: the write deadline of ``listeners`` covers
    every write, on every platform, and a kernel abort at the same moment only raced it (the
    log then could not say why a connection went). What it did beyond that, aborting an idle
    connection whose last data is never acknowledged, Hypercorn's keep-alive timeout does too.
    """
    sockets = hc.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.listen(hc.backlog)  # Hypercorn listens only on sockets it made itself
    return sockets


def listeners(hc: HypercornConfig, send_timeout_s: float | None) -> list[trio.abc.Listener]:
    """One Trio listener per bind, whose streams give up a write after ``send_timeout_s``
    without progress (``trioserve.net``); ``None``, 0 or infinity turns the deadline off, as
    it turns off the stream's own send timeout."""
    deadline = send_timeout_s is not None and 0 < send_timeout_s < math.inf
    sockets = served_sockets(hc)
    if sockets.secure_sockets or sockets.quic_sockets:  # hypercorn_config sets no certificate
        raise RuntimeError("trioserve serve has no TLS; put a TLS proxy in front of it")
    result: list[trio.abc.Listener] = []
    for sock in sockets.insecure_sockets:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        result.append(WriteDeadlineListener(listener, send_timeout_s) if deadline else listener)
    return result


async def _hypercorn_serve(
    app: AppWrapper,
    hc: HypercornConfig,
    listeners: list[trio.abc.Listener],
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
) -> None:
    """``hypercorn.trio.run.worker_serve`` (0.18), serving listeners we built.

    Hypercorn has no hook for wrapping accepted streams: ``worker_serve`` builds its
    ``trio.SocketListener``s itself from sockets. This is the same function, line for line,
    minus what ``trioserve serve`` never uses (TLS, QUIC, statsd, ``max_requests``, the
    "Running on" lines, ``task_status``), taking ``listeners`` instead of ``sockets``.

    Shutdown, as in Hypercorn: when ``shutdown_trigger`` returns, the listeners close, open
    connections get ``hc.graceful_timeout`` and are then cancelled, and the lifespan shutdown
    runs once the last connection has closed. A write stuck on a client that reads nothing is
    shielded from that cancel; the listeners' write deadline is what ends it.
    """
    lifespan_state: dict = {}
    lifespan = Lifespan(app, hc, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(
                                _Connection,
                                app,
                                hc,
                                context,
                                ConnectionState(lifespan_state.copy()),
                            ),
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + hc.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _stop_on_signals(
    stop: trio.Event, drain: Drain, force_exit: Callable[[int], object] | None = None
) -> None:
    """First signal: stop accepting, let in-flight work finish for the grace period, then
    end it with errors; the server returns once the last connection is done. A second
    SIGINT/SIGTERM, at any time after that, exits at once (``force_exit``, by default
    ``exit_by_signal``): "press Ctrl-C twice" for an operator who will not wait."""
    force_exit = force_exit or exit_by_signal
    draining = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                if draining:
                    log.warning(
                        "received %s again: exiting now, without waiting for open requests "
                        "and connections",
                        name,
                    )
                    force_exit(signum)
                    nursery.cancel_scope.cancel()  # reached only where force_exit returns
                    return
                draining = True
                log.info(
                    "received %s: no new requests; in-flight ones get %g s to finish "
                    "(send %s again to exit at once)",
                    name,
                    drain.grace_s,
                    name,
                )
                drain.begin()
                stop.set()
                nursery.start_soon(_end_after_grace, drain)


async def _end_after_grace(drain: Drain) -> None:
    await trio.sleep(drain.grace_s)
    drain.expire()
    log.info("grace period over: ending the requests still running")


def exit_by_signal(signum: int) -> None:
    """End the process now, by the signal's default action, so a parent sees it killed by
    that signal (a shell: 130 for SIGINT, 143 for SIGTERM). No cleanup runs: a forced exit
    must not wait for the tasks or threads that made the operator force it."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # only if the default action did not end the process


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
