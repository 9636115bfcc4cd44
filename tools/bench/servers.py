"""The servers, on one model: trioserve, mlx-lm's own server and, when a binary is given,
llama.cpp's llama-server.

trioserve and the peer run the converted model directory's float32 weights on OpenBLAS (the
peer through LD_PRELOAD, checked in /proc/PID/maps once it runs) with the same OpenBLAS thread
count. llama-server serves the GGUF file that directory was converted from, as it is (its own
CPU kernels on the file's quantization, every core unless ``--blas-threads`` is given): what a
Linux user who picks it would run. Each has one slot per stream of the largest workload, on
127.0.0.1, with its log in a file; all run in sessions of their own (Ctrl-C reaches only the
driver, which stops them) and die with the driver.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench_common import ROOT, mapped_libraries, openblas_path

from trioserve.models.registry import default_gguf_path
from trioserve.testing import ServerProcess, free_port

SERVER_NAMES = ("trioserve", "peer", "llama-server")
# llama-server's context per slot: the longest prompt of the workloads (3000 tokens) plus
# the background streams' 2048 tokens, rounded up.
LLAMA_SLOT_CONTEXT = 6144


def blas_env(args: argparse.Namespace) -> dict[str, str]:
    """``--blas-threads`` (or the user's OPENBLAS_NUM_THREADS) as the same fixed OpenBLAS
    thread count for every process; none: each server as it runs out of the box (trioserve
    ``--blas-threads auto``, mlx_lm.server OpenBLAS's default of every core)."""
    import trioserve  # noqa: F401

    threads = (
        str(args.blas_threads) if args.blas_threads else os.environ.get("OPENBLAS_NUM_THREADS")
    )
    return {"OPENBLAS_NUM_THREADS": threads} if threads else {}


def trioserve_server(
    model_dir: Path,
    logs: Path,
    env: dict[str, str],
    slots: int,
    *,
    prefill_step_size: int = 64,
    extra: Sequence[str] = (),
    name: str = "trioserve",
) -> ServerProcess:
    """``trioserve serve`` on ``model_dir`` with ``slots`` slots (``extra``: more flags), on a
    free port, logging to ``logs/NAME.log``; not started yet."""
    port = free_port()
    argv = [
        *(sys.executable, "-m", "trioserve", "serve", "--model", str(model_dir)),
        *("--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots)),
        *("--prefill-step-size", str(prefill_step_size), "--log-level", "warning"),
        *extra,
    ]
    return _server(name, argv, port, env, logs)


def peer_server(
    model_dir: Path,
    logs: Path,
    env: dict[str, str],
    slots: int,
    *,
    prefill_step_size: int = 256,
    extra: Sequence[str] = (),
    name: str = "peer",
) -> ServerProcess:
    """``mlx_lm.server`` on ``model_dir`` with ``slots`` concurrent decodes and prefills, on
    OpenBLAS (LD_PRELOAD of the one trioserve loads, on top of ``env``); not started yet.

    Raises:
        SystemExit: if trioserve loads no OpenBLAS here (the peer would run on the slow BLAS).
    """
    blas = openblas_path()
    if blas is None:
        raise SystemExit("trioserve loads no OpenBLAS here: the peer would run on the slow BLAS")
    port = free_port()
    argv = [
        *(sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--decode-concurrency", str(slots), "--prompt-concurrency", str(slots)),
        *("--prefill-step-size", str(prefill_step_size), "--log-level", "WARNING"),
        *extra,
    ]
    return _server(name, argv, port, {**env, "LD_PRELOAD": blas}, logs)


def llama_server(
    binary: Path,
    gguf: Path,
    logs: Path,
    slots: int,
    *,
    threads: int | None = None,
    name: str = "llama-server",
) -> ServerProcess:
    """llama.cpp's ``llama-server`` on ``gguf`` with ``slots`` parallel sequences (continuous
    batching, its default), ``LLAMA_SLOT_CONTEXT`` tokens each, its own chat template from the
    file; ``threads``: ``--threads`` (default: llama.cpp's choice); not started yet."""
    port = free_port()
    argv = [
        *(str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", str(slots), "--ctx-size", str(slots * LLAMA_SLOT_CONTEXT)),
        *(("--threads", str(threads)) if threads else ()),
    ]
    return _server(name, argv, port, {}, logs)


def _server(
    name: str, argv: list[str], port: int, env: dict[str, str], logs: Path
) -> ServerProcess:
    return ServerProcess(
        argv,
        port,
        log_path=logs / f"{name}.log",
        env=env,
        cwd=ROOT,
        name=name,
        new_session=True,  # Ctrl-C reaches only the driver, which stops us cleanly
        die_with_parent=True,  # no server outlives the benchmark
    )


def make_servers(
    args: argparse.Namespace, model_dir: Path, logs: Path, slots: int
) -> list[ServerProcess]:
    """The servers ``--only`` asks for (trioserve and the peer by default, and llama-server
    when ``--llama-server`` names its binary), not started yet."""
    env = blas_env(args)
    servers = []
    if args.only in (None, "trioserve"):
        step = args.prefill_step_size
        servers.append(trioserve_server(model_dir, logs, env, slots, prefill_step_size=step))
    if args.only in (None, "peer"):
        step = args.peer_prefill_step_size
        servers.append(peer_server(model_dir, logs, env, slots, prefill_step_size=step))
    if args.llama_server and args.only in (None, "llama-server"):
        gguf = args.gguf or default_gguf_path()
        threads = args.blas_threads
        servers.append(llama_server(args.llama_server, gguf, logs, slots, threads=threads))
    return servers


def check_blas(servers: list[ServerProcess]) -> None:
    """Every server really runs on OpenBLAS (read from its memory map); say which one.

    Raises:
        RuntimeError: if one has no OpenBLAS mapped: the comparison would be unfair.
    """
    # The very file trioserve loads: numpy's own OpenBLAS is mapped in mlx-lm either way.
    blas = Path(openblas_path() or "libopenblas").name
    for s in servers:
        if s.name == "llama-server":  # ggml's own kernels: no BLAS to check
            print(f"{s.name}: pid {s.pid}, {' '.join(s.argv[1:5])} ...", file=sys.stderr)
            continue
        libs = mapped_libraries(s.pid, blas)
        if not libs:
            raise RuntimeError(f"{s.name} has no OpenBLAS mapped: the comparison is unfair")
        print(
            f"{s.name}: pid {s.pid}, {' '.join(s.argv[1:4])} ..., BLAS {libs[0]}",
            file=sys.stderr,
        )
