"""trioserve beside mlx-lm's own server, over HTTP, on the same weights (issue 6 §1).

Why: mlx_lm.server is what a user would run instead. This starts both on one converted model
directory (float32, OpenBLAS in both: LD_PRELOAD for the peer, checked in /proc/PID/maps),
sends both the same streamed chat requests (temperature 0, max_tokens 128), interleaved, each
figure ``--repeat`` times, and prints min, median and the trioserve / peer ratio of medians.
It also measures the limit with no HTTP (raw mlx-lm, through tools/bench_engine.py).

Timing is client-side: tokens are the SSE chunks with content, stamped as they arrive. Every
prompt carries a fresh nonce, so no prompt cache answers it. Before each run, the driver waits
until both servers are idle (their own CPU time, from /proc), so one server's leftovers never
land in the other's figures. The figures are only as quiet as the machine: note its load
(printed) and rerun on an idle machine for numbers worth quoting.

Usage:
    .venv/bin/python tools/bench_server.py [--repeat 3] [--json OUT] [--plot OUT.png]
    .venv/bin/python tools/bench_server.py --quick            # a smoke check, a few minutes
    .venv/bin/python tools/bench_server.py --only trioserve   # or --only peer
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from bench_common import (
    ROOT,
    TokenTrace,
    aggregate_decode_rate,
    chat_token_counter,
    cpu_seconds,
    default_model_dir,
    fmt,
    long_messages,
    machine_line,
    mapped_libraries,
    openblas_path,
    percentile,
    print_table,
    ratio,
    rss_mib,
    story_messages,
    summarize,
)

SERVER_NAMES = ("trioserve", "peer")
CONCURRENCY = (1, 4, 8)
SCENARIOS = ("streams", "ttft", "seeded", "interference", "hangup")
IDLE_CPU_PER_S = 0.05  # a server is idle below this many CPU-seconds per second


# -- the servers ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, so no server outlives it (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One server process on 127.0.0.1, its log in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.argv, self.env, self.port, self.log_path = name, argv, env, port, log
        self.proc: subprocess.Popen | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only the driver, which stops us cleanly
            preexec_fn=_die_with_parent,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blas_env(args: argparse.Namespace) -> dict[str, str]:
    """The same OpenBLAS thread count for every process: ``--blas-threads``, else the one
    trioserve picks for itself (importing trioserve sets a default when none is set)."""
    import trioserve  # noqa: F401

    threads = (
        str(args.blas_threads) if args.blas_threads else os.environ.get("OPENBLAS_NUM_THREADS")
    )
    return {"OPENBLAS_NUM_THREADS": threads} if threads else {}


def make_servers(args: argparse.Namespace, model_dir: Path, logs: Path) -> list[Server]:
    env = {**os.environ, **blas_env(args)}
    servers = []
    if args.only in (None, "trioserve"):
        port = _free_port()
        argv = [
            sys.executable,
            "-m",
            "trioserve",
            "serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--parallel",
            str(max(CONCURRENCY)),
            "--prefill-step-size",
            str(args.prefill_step_size),
            "--log-level",
            "warning",
        ]
        servers.append(Server("trioserve", argv, env, port, logs / "trioserve.log"))
    if args.only in (None, "peer"):
        blas = openblas_path()
        if blas is None:
            raise SystemExit("cmeel-openblas is not installed: the peer would run on the slow BLAS")
        port = _free_port()
        argv = [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--decode-concurrency",
            str(max(CONCURRENCY)),
            "--prompt-concurrency",
            str(max(CONCURRENCY)),
            "--prefill-step-size",
            str(args.peer_prefill_step_size),
            "--log-level",
            "WARNING",
        ]
        servers.append(Server("peer", argv, {**env, "LD_PRELOAD": blas}, port, logs / "peer.log"))
    return servers


# -- one streamed request ---------------------------------------------------------------


@dataclass
class StreamResult:
    trace: TokenTrace = field(default_factory=lambda: TokenTrace(sent_at=time.perf_counter()))
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def chat_body(
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if seed is not None:
        body["seed"] = seed
    return body


async def stream_chat(
    client: httpx.AsyncClient,
    server: Server,
    body: dict[str, Any],
    result: StreamResult,
    *,
    limit_s: float,
    on_token: Callable[[StreamResult], bool] | None = None,
) -> StreamResult:
    """POST a streamed chat request and record, into ``result``, when each token arrives.

    ``on_token`` returning True hangs up (closes the connection). Cancelling the caller's
    scope hangs up too; ``result`` keeps what arrived until then.
    """
    result.trace.sent_at = time.perf_counter()
    try:
        with trio.move_on_after(limit_s) as scope:
            await _read_stream(client, server, body, result, on_token)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:  # a dead server, a broken stream
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    if scope.cancelled_caught:
        result.error = f"no complete answer within {limit_s:.0f} s"
    return result


async def _read_stream(
    client: httpx.AsyncClient,
    server: Server,
    body: dict[str, Any],
    result: StreamResult,
    on_token: Callable[[StreamResult], bool] | None,
) -> None:
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, ': keepalive' comments, 'event:' names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"])[:200]
                break
            if chunk.get("usage"):
                result.trace.tokens = chunk["usage"].get("completion_tokens")
                result.prompt_tokens = chunk["usage"].get("prompt_tokens")
            got_token = False
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    got_token = True
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
            if got_token:
                result.trace.token_times.append(now)
                if on_token is not None and on_token(result):
                    break


# -- the benchmark ----------------------------------------------------------------------


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    goal: str = ""


class Bench:
    """Runs the scenarios against each server and keeps every figure."""

    def __init__(self, args: argparse.Namespace, servers: list[Server], tokenizer: Any):
        self.args = args
        self.servers = servers
        self.count_tokens = chat_token_counter(tokenizer)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(max_connections=64)
        )
        self.values: dict[str, dict[str, list[float | None]]] = {s.name: {} for s in servers}
        self.prompt_sizes: dict[str, dict[str, list[int]]] = {s.name: {} for s in servers}
        self.details: list[dict[str, Any]] = []
        self._long_prompts: dict[str, tuple[list[dict[str, str]], int]] = {}

    # -- bookkeeping --

    def record(self, server: Server, key: str, value: float | None, prompt: int | None = None):
        self.values[server.name].setdefault(key, []).append(value)
        if prompt is not None:
            self.prompt_sizes[server.name].setdefault(key, []).append(prompt)

    def long_prompt(self, tag: str, target: int) -> tuple[list[dict[str, str]], int]:
        """The same long prompt for every server within a repeat (built once)."""
        if tag not in self._long_prompts:
            self._long_prompts[tag] = long_messages(self.count_tokens, target, nonce=tag)
        return self._long_prompts[tag]

    async def wait_idle(self) -> bool:
        """Wait until no server burns CPU (a cancelled prefill may still be running)."""
        deadline = time.perf_counter() + self.args.idle_timeout
        while time.perf_counter() < deadline:
            before = [cpu_seconds(s.pid) for s in self.servers]
            await trio.sleep(1.0)
            after = [cpu_seconds(s.pid) for s in self.servers]
            if all(b - a < IDLE_CPU_PER_S for a, b in zip(before, after, strict=True)):
                return True
        print(
            f"  warning: a server was still busy after {self.args.idle_timeout} s", file=sys.stderr
        )
        return False

    async def stream(self, server: Server, body: dict[str, Any], **kw: Any) -> StreamResult:
        result = StreamResult()
        await stream_chat(
            self.client, server, body, result, limit_s=self.args.request_timeout, **kw
        )
        return result

    # -- start-up --

    async def wait_ready(self, server: Server) -> None:
        deadline = time.perf_counter() + self.args.start_timeout
        while True:
            if server.proc is None or server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                resp = await self.client.get(f"{server.url}/health", timeout=5)
                if resp.status_code == 200:
                    break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{server.name} not ready in time:\n{server.log_tail()}")
            await trio.sleep(0.5)
        warm = await self.stream(server, chat_body(story_messages(0, "warm-up"), 8))
        if warm.error:
            raise RuntimeError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail()}")

    async def idle_figures(self, when: str) -> None:
        """Idle RSS, and CPU-seconds over 5 idle seconds (all servers in the same window)."""
        await self.wait_idle()
        before = {s.name: cpu_seconds(s.pid) for s in self.servers}
        await trio.sleep(5.0)
        for s in self.servers:
            self.record(s, f"idle_rss_mib_{when}", rss_mib(s.pid))
            if when == "start":
                self.record(s, "idle_cpu_s", cpu_seconds(s.pid) - before[s.name])

    # -- scenarios: each runs once on one server and records its figures --

    async def streams(self, server: Server, rep: int, n: int, seeded: bool) -> None:
        """``n`` concurrent streams on ~50-token prompts: aggregate decode tok/s, and more."""
        tag = f"r{rep}{'s' if seeded else 'g'}{n}"
        results = [StreamResult() for _ in range(n)]
        temperature = self.args.seed_temperature if seeded else 0.0

        async def one(i: int) -> None:
            seed = 1000 * rep + i + 1 if seeded else None
            body = chat_body(
                story_messages(i, f"{tag}-{i}"), self.args.max_tokens, temperature, seed
            )
            await stream_chat(
                self.client, server, body, results[i], limit_s=self.args.request_timeout
            )

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        errors = [r.error for r in results if r.error]
        traces = [r.trace for r in results]
        agg = None if errors else aggregate_decode_rate(traces)
        kind = "seeded" if seeded else "greedy"
        self.record(server, f"agg_{kind}_tps_{n}", agg)
        if n == 1 and not seeded:
            r = results[0]
            self.record(server, "ttft_short_s", r.trace.ttft, r.prompt_tokens)
            self.record(server, "decode_tps_1", None if errors else r.trace.decode_rate())
        if n == max(CONCURRENCY) and not seeded:
            gaps = [g * 1000 for t in traces for g in t.gaps()]
            self.record(server, "itl_p50_ms", None if errors else percentile(gaps, 50))
            self.record(server, "itl_p95_ms", None if errors else percentile(gaps, 95))
        self._detail(server, rep, f"streams_{kind}_{n}", results, aggregate_tps=agg)

    async def ttft(self, server: Server, rep: int, target: int) -> None:
        """One stream on a long prompt: time to first token."""
        messages, _ = self.long_prompt(f"r{rep}-ttft{target}", target)
        r = await self.stream(server, chat_body(messages, self.args.max_tokens))
        self.record(server, f"ttft_{target}_s", None if r.error else r.trace.ttft, r.prompt_tokens)
        self._detail(server, rep, f"ttft_{target}", [r])

    async def interference(self, server: Server, rep: int) -> None:
        """Streams decode; a long prompt arrives: the longest gap they see until its first token."""
        args = self.args
        background = [StreamResult() for _ in range(args.interference_streams)]
        all_started, long_first = trio.Event(), trio.Event()
        long_result = StreamResult()

        def started(_: StreamResult) -> bool:
            if all(len(b.trace.token_times) >= 3 for b in background):
                all_started.set()
            return False

        def first(_: StreamResult) -> bool:
            long_first.set()
            return False

        async def run_background(i: int) -> None:
            body = chat_body(story_messages(i + 3, f"r{rep}-bg{i}"), args.background_tokens)
            await stream_chat(
                self.client,
                server,
                body,
                background[i],
                limit_s=args.request_timeout,
                on_token=started,
            )

        async def run_long(body: dict[str, Any]) -> None:
            await stream_chat(
                self.client, server, body, long_result, limit_s=args.request_timeout, on_token=first
            )
            long_first.set()  # also on error or timeout: stop waiting

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as bg:
                for i in range(len(background)):
                    bg.start_soon(run_background, i)
                with trio.move_on_after(args.request_timeout):
                    await all_started.wait()
                messages, _ = self.long_prompt(f"r{rep}-interfere", args.interfere_prompt)
                arrived = time.perf_counter()
                outer.start_soon(run_long, chat_body(messages, 8))
                await long_first.wait()
                first_at = time.perf_counter()
                bg.cancel_scope.cancel()  # hang up the background streams
        # Every gap that overlaps [arrived, first_at]; one still open when we hung up counts
        # up to first_at. Covered: some stream was still decoding when the first token came.
        longest, covered = None, False
        for b in background:
            t = b.trace.token_times
            if not t:
                continue
            gaps = [z - a for a, z in zip(t, t[1:], strict=False) if z > arrived and a < first_at]
            if b.finish_reason is None and t[-1] < first_at:
                gaps.append(first_at - max(t[-1], arrived))
            if gaps:
                longest = max(longest or 0.0, *gaps)
            covered = covered or t[-1] >= first_at or b.finish_reason is None
        covered = covered and not long_result.error
        self.record(
            server, "interference_gap_s", longest if covered else None, long_result.prompt_tokens
        )
        self._detail(
            server,
            rep,
            "interference",
            [*background, long_result],
            longest_gap_s=longest,
            covered=covered,
            long_ttft_s=long_result.trace.ttft,
        )

    async def disconnect(self, server: Server, rep: int, phase: str) -> None:
        """Hang up mid-prefill (a long prompt) or mid-decode; then the server's CPU-seconds
        over the next 5 s, and the next request's time to first token."""
        args = self.args
        if phase == "prefill":
            messages, _ = self.long_prompt(f"r{rep}-hangup", args.interfere_prompt)
            body = chat_body(messages, args.max_tokens)
        else:
            body = chat_body(story_messages(5, f"r{rep}-hangup-decode"), args.background_tokens)

        def on_token(r: StreamResult) -> bool:  # mid-decode: hang up after a few tokens
            return phase == "decode" and len(r.trace.token_times) >= args.hangup_tokens

        result = StreamResult()
        # Its own connection pool, closed at once: the hang-up is a real socket close.
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
            with trio.move_on_after(args.hangup_after if phase == "prefill" else math.inf):
                await stream_chat(
                    client, server, body, result, limit_s=args.request_timeout, on_token=on_token
                )
        cpu_before = cpu_seconds(server.pid)
        await trio.sleep(5.0)
        cpu = cpu_seconds(server.pid) - cpu_before
        # Mid-prefill: no token came before the hang-up; mid-decode: the tokens we waited for.
        got = len(result.trace.token_times)
        as_planned = not result.error and (
            got == 0 if phase == "prefill" else got >= args.hangup_tokens
        )
        nxt = await self.stream(server, chat_body(story_messages(6, f"r{rep}-next-{phase}"), 16))
        self.record(server, f"hangup_{phase}_cpu_s", cpu if as_planned else None)
        self.record(server, f"hangup_{phase}_next_ttft_s", None if nxt.error else nxt.trace.ttft)
        self._detail(
            server, rep, f"hangup_{phase}", [result, nxt], cpu_s=cpu, as_planned=as_planned
        )

    def _detail(self, server: Server, rep: int, name: str, results: list[StreamResult], **extra):
        self.details.append(
            {
                "server": server.name,
                "rep": rep,
                "scenario": name,
                "streams": [
                    {
                        "prompt_tokens": r.prompt_tokens,
                        "completion_tokens": r.trace.count,
                        "ttft_s": r.trace.ttft,
                        "decode_tps": r.trace.decode_rate(),
                        "finish_reason": r.finish_reason,
                        "error": r.error,
                    }
                    for r in results
                ],
                **extra,
            }
        )
        errors = [r.error for r in results if r.error]
        if errors:
            print(f"  warning: {server.name} {name}: {errors[0]}", file=sys.stderr)

    # -- the whole run --

    def scenarios(self, rep: int) -> list[tuple[str, Callable[[Server], Any]]]:
        steps: list[tuple[str, str, Callable[[Server], Any]]] = []
        for n in CONCURRENCY:
            steps.append(
                ("streams", f"{n} stream(s)", lambda s, n=n: self.streams(s, rep, n, False))
            )
        for target in self.args.ttft_lengths:
            steps.append(("ttft", f"TTFT {target}", lambda s, t=target: self.ttft(s, rep, t)))
        for n in CONCURRENCY:
            steps.append(("seeded", f"{n} seeded", lambda s, n=n: self.streams(s, rep, n, True)))
        steps.append(("interference", "interference", lambda s: self.interference(s, rep)))
        steps.append(
            ("hangup", "hang-up mid-prefill", lambda s: self.disconnect(s, rep, "prefill"))
        )
        steps.append(("hangup", "hang-up mid-decode", lambda s: self.disconnect(s, rep, "decode")))
        return [(name, fn) for group, name, fn in steps if group in self.args.scenarios]

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            for s in self.servers:
                nursery.start_soon(self.wait_ready, s)
        for s in self.servers:
            libs = mapped_libraries(s.pid, "libopenblas")
            if not libs:
                raise RuntimeError(f"{s.name} has no libopenblas mapped: the comparison is unfair")
            print(
                f"{s.name}: pid {s.pid}, {' '.join(s.argv[1:4])} ..., BLAS {libs[0]}",
                file=sys.stderr,
            )
        await self.idle_figures("start")
        for rep in range(self.args.repeat):
            order = self.servers if rep % 2 == 0 else self.servers[::-1]
            for name, step in self.scenarios(rep):
                for server in order:
                    await self.wait_idle()
                    started = time.perf_counter()
                    await step(server)
                    print(
                        f"  [rep {rep + 1}/{self.args.repeat}] {server.name:<9} {name:<20} "
                        f"{time.perf_counter() - started:6.1f} s  {self._last(server)}",
                        file=sys.stderr,
                    )
        await self.idle_figures("end")

    def _last(self, server: Server) -> str:
        d = self.details[-1]
        counts = [s["completion_tokens"] for s in d["streams"]]
        return f"tokens {counts}"


# -- in-process limits (no HTTP) --------------------------------------------------------


def measure_limits(args: argparse.Namespace, model_dir: Path, out: Path) -> dict | None:
    """raw mlx-lm stream_generate and BatchGenerator at 8, in a child process (bench_engine)."""
    env = {**os.environ, **blas_env(args)}
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_engine.py"),
        "--limits-only",
        "--max-tokens",
        str(args.max_tokens),
        "--repeat",
        str(args.repeat),
        "--prefill-step-size",
        str(args.prefill_step_size),
        "--model",
        str(model_dir),
        "--json",
        str(out),
    ]
    print("in-process limits (no HTTP): " + " ".join(cmd[1:]), file=sys.stderr)
    try:
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"  warning: in-process limits failed: {exc}", file=sys.stderr)
        return None
    runs = json.loads(out.read_text())["runs"]
    return {
        "stream_generate_tps": [r["decode_tps"] for r in runs["stream_generate"]],
        "batch_generator_8_tps": [r["aggregate_tps"] for r in runs["batch_generator_8"]],
    }


# -- the report -------------------------------------------------------------------------


def figures(args: argparse.Namespace) -> list[Figure]:
    out = [Figure("ttft_short_s", "TTFT, short prompt", "s")]
    for t in args.ttft_lengths:
        out.append(Figure(f"ttft_{t}_s", f"TTFT, ~{t}-token prompt", "s", "<= 1"))
    out.append(Figure("decode_tps_1", "decode tok/s, 1 stream", "tok/s"))
    for n in CONCURRENCY:
        out.append(
            Figure(
                f"agg_greedy_tps_{n}",
                f"aggregate tok/s, {n} stream{'s' if n > 1 else ''}",
                "tok/s",
                ">= 1.1" if n == 8 else "",
            )
        )
    temp = args.seed_temperature
    for n in CONCURRENCY:
        out.append(
            Figure(
                f"agg_seeded_tps_{n}",
                f"aggregate tok/s, {n} seeded (T={temp:g})",
                "tok/s",
                ">= 4" if n == 8 else "",
            )
        )
    out += [
        Figure("itl_p50_ms", "inter-token latency p50, 8 streams", "ms"),
        Figure("itl_p95_ms", "inter-token latency p95, 8 streams", "ms", "<= 0.9"),
        Figure(
            "interference_gap_s",
            f"longest gap of {args.interference_streams} streams, long prompt arrives",
            "s",
        ),
        Figure(
            "hangup_prefill_cpu_s", "CPU-s in 5 s after hang-up mid-prefill", "CPU-s", "abs <= 0.3"
        ),
        Figure("hangup_prefill_next_ttft_s", "  then TTFT of the next request", "s", "abs <= 1"),
        Figure("hangup_decode_cpu_s", "CPU-s in 5 s after hang-up mid-decode", "CPU-s"),
        Figure("hangup_decode_next_ttft_s", "  then TTFT of the next request", "s"),
        Figure("idle_cpu_s", "idle CPU-s in 5 s", "CPU-s"),
        Figure("idle_rss_mib_start", "idle RSS after warm-up", "MiB"),
        Figure("idle_rss_mib_end", "idle RSS at the end", "MiB"),
    ]
    return out


def _label(bench: Bench, fig: Figure) -> str:
    """Figures on a prompt say its measured size (from the servers' usage)."""
    sizes = [n for per in bench.prompt_sizes.values() for n in per.get(fig.key, [])]
    if not sizes:
        return fig.label
    size = sorted(sizes)[len(sizes) // 2]
    if fig.key.startswith("ttft_"):
        return f"TTFT, {size}-token prompt"
    if fig.key == "interference_gap_s":
        return f"{fig.label} ({size} tokens)"
    return fig.label


def summary(bench: Bench, args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    return {
        name: {f.key: summarize(per.get(f.key, [])) for f in figures(args)}
        for name, per in bench.values.items()
    }


def print_report(bench: Bench, args: argparse.Namespace, limits: dict | None) -> None:
    table = summary(bench, args)
    names = [s.name for s in bench.servers]
    print(f"\nbench_server: {machine_line()}")
    print(
        f"model {args.model_dir}, float32; max_tokens {args.max_tokens}, temperature 0 "
        f"(seeded rows: T={args.seed_temperature:g}, a distinct seed per request); "
        f"{args.repeat} repeat(s), interleaved"
    )
    threads = blas_env(args).get("OPENBLAS_NUM_THREADS", "OpenBLAS's default")
    print(f"OPENBLAS_NUM_THREADS for both servers and the in-process limit: {threads}")
    for s in bench.servers:
        print(f"  {s.name}: {' '.join(Path(a).name if a.startswith('/') else a for a in s.argv)}")
    headers = ["figure", "unit"]
    for n in names:
        headers += [f"{n} min", f"{n} med"]
    headers += ["ratio t/p", "goal"]
    rows = []
    for f in figures(args):
        cells = [_label(bench, f), f.unit]
        for n in names:
            s = table[n][f.key]
            digits = 0 if f.unit == "MiB" else 1 if f.unit in ("ms", "tok/s") else 2
            cells += [fmt(s["min"], digits), fmt(s["median"], digits)]
        if len(names) == 2:
            cells.append(
                fmt(ratio(table["trioserve"][f.key]["median"], table["peer"][f.key]["median"]))
            )
        else:
            cells.append("—")
        cells.append(f.goal)
        rows.append(cells)
    print_table(headers, rows)
    print("ratio t/p = trioserve median / peer median. Goals (issue 6): ratios unless 'abs'.")
    if limits:
        sg, bg = (
            summarize(limits["stream_generate_tps"]),
            summarize(limits["batch_generator_8_tps"]),
        )
        print("\nin-process limit, no HTTP (raw mlx-lm, same weights and prefill step):")
        lim_rows = [
            ["mlx-lm stream_generate decode tok/s", fmt(sg["min"], 1), fmt(sg["median"], 1)],
            ["mlx-lm BatchGenerator, 8 prompts, tok/s", fmt(bg["min"], 1), fmt(bg["median"], 1)],
        ]
        print_table(["figure", "min", "median"], lim_rows)
        if "trioserve" in names:
            one = table["trioserve"]["decode_tps_1"]["median"]
            eight = table["trioserve"]["agg_greedy_tps_8"]["median"]
            print(
                f"trioserve / limit: 1 stream {fmt(ratio(one, sg['median']))} (goal >= 0.95), "
                f"8 streams {fmt(ratio(eight, bg['median']))} (goal >= 0.95)"
            )


def plot(bench: Bench, args: argparse.Namespace, out: Path) -> None:
    """Aggregate tok/s against concurrency, and TTFT against prompt length (issue 8 §3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot needs matplotlib: `.venv/bin/pip install matplotlib`; no plot written.",
            file=sys.stderr,
        )
        return
    table = summary(bench, args)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"trioserve": "tab:blue", "peer": "tab:orange"}
    labels = {"trioserve": "trioserve", "peer": "mlx_lm.server"}
    for s in bench.servers:
        for kind, style in (("greedy", "-"), ("seeded", "--")):
            xs, ys = [], []
            for n in CONCURRENCY:
                value = table[s.name][f"agg_{kind}_tps_{n}"]["median"]
                if value is not None:
                    xs.append(n)
                    ys.append(value)
            ax1.plot(
                xs, ys, style, marker="o", color=colors[s.name], label=f"{labels[s.name]}, {kind}"
            )
        keys = ["ttft_short_s"] + [f"ttft_{t}_s" for t in args.ttft_lengths]
        pts = []
        for key in keys:
            sizes = bench.prompt_sizes[s.name].get(key, [])
            value = table[s.name][key]["median"]
            if sizes and value is not None:
                pts.append((sorted(sizes)[len(sizes) // 2], value))
        if pts:
            ax2.plot(
                *zip(*sorted(pts), strict=True),
                marker="o",
                color=colors[s.name],
                label=labels[s.name],
            )
    ax1.set(
        xlabel="concurrent streams",
        ylabel="aggregate decode tokens/s",
        title="Throughput",
        xticks=list(CONCURRENCY),
    )
    ax2.set(xlabel="prompt tokens", ylabel="time to first token (s)", title="Time to first token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"SmolLM2-135M float32, median of {args.repeat}; {machine_line()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot written to {out}", file=sys.stderr)


# -- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="mlx-lm model dir (default: the embedded model)")
    p.add_argument("--repeat", type=int, help="runs per figure (default 3; --quick: 1)")
    p.add_argument("--max-tokens", type=int, help="per request (default 128; --quick: 32)")
    p.add_argument("--quick", action="store_true", help="a smoke check: fewer, shorter runs")
    p.add_argument("--only", choices=SERVER_NAMES, help="run one server only")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    p.add_argument(
        "--prefill-step-size", type=int, default=64, help="for trioserve (its default: 64)"
    )
    p.add_argument(
        "--peer-prefill-step-size",
        type=int,
        default=256,
        help="for mlx_lm.server: 256 gave its best TTFT here (8.4 s against 12.7 s at 2048)",
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS_NUM_THREADS for both servers (default: what trioserve picks)",
    )
    p.add_argument(
        "--ttft-lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        help="long-prompt TTFT targets in tokens (default 1500; --quick: 600)",
    )
    p.add_argument(
        "--interfere-prompt",
        type=int,
        help="tokens of the prompt that arrives mid-stream and of the hung-up prefill"
        " (default 3000; --quick: 1200)",
    )
    p.add_argument("--interference-streams", type=int, default=2)
    p.add_argument(
        "--seed-temperature",
        type=float,
        default=0.7,
        help="temperature of the seeded runs (at 0, trioserve ignores the seed)",
    )
    p.add_argument("--hangup-after", type=float, default=2.0, help="s into the prefill")
    p.add_argument("--hangup-tokens", type=int, default=10, help="tokens into the decode")
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help=f"a comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--no-limits", action="store_true", help="skip the in-process limit")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--idle-timeout", type=float, default=180.0)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--deadline-min", type=float, default=120.0, help="the whole run's bound")
    args = p.parse_args()
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.max_tokens = args.max_tokens or (32 if q else 128)
    args.ttft_lengths = args.ttft_lengths or ([600] if q else [1500])
    args.interfere_prompt = args.interfere_prompt or (1200 if q else 3000)
    # Background streams must outlast the long prompt's prefill.
    args.background_tokens = 2048
    return args


def main() -> int:
    args = parse_args()
    args.model_dir = args.model or default_model_dir()
    from transformers import AutoTokenizer  # the same tokenizer files both servers load

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp:
        tmp_dir = Path(tmp)
        limits = None
        if not args.no_limits:
            limits = measure_limits(args, args.model_dir, tmp_dir / "limits.json")
        servers = make_servers(args, args.model_dir, tmp_dir)
        bench = Bench(args, servers, tokenizer)
        try:
            for s in servers:
                s.start()

            async def bounded() -> None:
                with trio.fail_after(args.deadline_min * 60):
                    await bench.run()

            trio.run(bounded)
        except BaseException:
            for s in servers:
                print(f"--- {s.name} log (tail) ---\n{s.log_tail()}", file=sys.stderr)
            raise
        finally:
            for s in servers:
                s.stop()
    print_report(bench, args, limits)
    if args.json:
        payload = {
            "machine": machine_line(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "servers": {s.name: s.argv for s in servers},
            "values": bench.values,
            "prompt_tokens": bench.prompt_sizes,
            "summary": summary(bench, args),
            "limits": limits,
            "details": bench.details,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"raw figures written to {args.json}", file=sys.stderr)
    if args.plot:
        plot(bench, args, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
