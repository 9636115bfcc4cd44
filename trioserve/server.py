"""``trioserve serve``: Hypercorn's Trio worker, in-process, around ``create_app``.

Scope tree: ``trio.run`` → ``serve`` nursery → ``hypercorn.trio.serve`` (its lifespan nursery
owns the engine; each connection owns its requests). SIGINT/SIGTERM trigger Hypercorn's
graceful shutdown; an engine that dies also shuts the server down, with exit status 1.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from trioserve.config import ServerConfig
from trioserve.lifecycle import Drain

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


def run_server(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; return the process exit status."""
    return trio.run(_serve, config)


async def _serve(config: ServerConfig) -> int:
    from trioserve.api.app import create_app

    app = create_app(config)
    state = app.extensions["trioserve"]
    stop = trio.Event()
    failure: list[str] = []

    def on_engine_failure(message: str) -> None:
        failure.append(message)
        stop.set()

    state.extras["on_engine_failure"] = on_engine_failure
    log.info(
        "trioserve on http://%s:%d/v1 serving %s (%d slot(s))",
        config.host,
        config.port,
        state.model_id,
        config.parallel,
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
        await worker_serve(
            wrap_app(app, hc.wsgi_max_body_size, None),
            hc,
            sockets=served_sockets(hc, config.send_timeout_s),
            shutdown_trigger=stop.wait,
        )
        nursery.cancel_scope.cancel()
    if failure:
        log.error("exiting: %s", failure[0])
        return 1
    log.info("stopped")
    return 0


# Kernel send buffer per connection. Linux autotunes it up to megabytes, which a client that
# keeps its socket open but reads nothing soaks up for minutes before any backpressure reaches
# the stream (seen: 1851 frames of ~3 KB in 14 s). Capped, a stalled reader blocks the stream
# after ~100 KB and --send-timeout can drop it. SSE writes are small, so this costs nothing.
SEND_BUFFER_BYTES = 64 * 1024


def served_sockets(hc: HypercornConfig, send_timeout_s: float | None):  # -> hypercorn Sockets
    """Hypercorn's listening sockets, with options that accepted connections inherit.

    - SO_SNDBUF capped (above).
    - TCP_USER_TIMEOUT = --send-timeout: the kernel aborts a connection whose client has kept
      its receive window shut (read nothing) that long. Dropping the stream frees the slot,
      but Hypercorn's write of the last frame waits, shielded, until the client reads again;
      only closing the socket ends that write, so a stalled reader cannot pin a connection.
      Linux 5.11+ counts zero-window time; older kernels keep the connection until the
      client reads (the slot is freed either way).
    """
    sockets = hc.create_sockets()
    for sock in (*sockets.insecure_sockets, *sockets.secure_sockets):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if send_timeout_s and tcp and hasattr(socket, "TCP_USER_TIMEOUT"):
            user_timeout_ms = max(1, round(send_timeout_s * 1000))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
        sock.listen(hc.backlog)  # Hypercorn listens only on sockets it made itself
    return sockets


async def _stop_on_signals(stop: trio.Event, drain: Drain) -> None:
    """First signal: stop accepting, let in-flight work finish for the grace period, then
    end it with errors. Hypercorn returns once the last connection is done."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info(
                "received %s: no new requests; in-flight ones get %g s to finish",
                signal.Signals(signum).name,
                drain.grace_s,
            )
            drain.begin()
            stop.set()
            break
    await trio.sleep(drain.grace_s)
    drain.expire()
    log.info("grace period over: ending the requests still running")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
