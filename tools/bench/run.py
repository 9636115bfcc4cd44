"""The whole run: warm-up, checks, then every scenario on every server, repeat by repeat.

Before each run the driver waits until every server is idle (its own CPU time, from /proc),
so one server's leftovers (a cancelled prefill still running) never land in the other's
figures; the order of the servers alternates between repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
import trio
from bench_common import chat_token_counter, cpu_seconds, rss_mib, story_messages

from trioserve.testing import ServerProcess

from .client import chat_body
from .results import Results
from .servers import check_blas
from .workloads import Workloads

IDLE_CPU_PER_S = 0.05  # a server is idle below this many CPU-seconds per second


class Bench:
    """Runs the scenarios against each (started, healthy) server and keeps every figure."""

    def __init__(self, args: argparse.Namespace, servers: list[ServerProcess], tokenizer: Any):
        self.args = args
        self.servers = servers
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(max_connections=64)
        )
        self.results = Results([s.name for s in servers])
        self.workloads = Workloads(args, self.client, chat_token_counter(tokenizer), self.results)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            for s in self.servers:
                nursery.start_soon(self.warm_up, s)
        check_blas(self.servers)
        await self.idle_figures("start")
        for rep in range(self.args.repeat):
            order = self.servers if rep % 2 == 0 else self.servers[::-1]
            for name, step in self.workloads.steps(rep):
                for server in order:
                    await self.wait_idle()
                    started = time.perf_counter()
                    await step(server)
                    print(
                        f"  [rep {rep + 1}/{self.args.repeat}] {server.name:<12} {name:<20} "
                        f"{time.perf_counter() - started:6.1f} s  {self.results.last_tokens()}",
                        file=sys.stderr,
                    )
        await self.idle_figures("end")

    async def warm_up(self, server: ServerProcess) -> None:
        warm = await self.workloads.stream(server, chat_body(story_messages(0, "warm-up"), 8))
        if warm.error:
            raise RuntimeError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail(15)}")

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

    async def idle_figures(self, when: str) -> None:
        """Idle RSS, and CPU-seconds over 5 idle seconds (all servers in the same window)."""
        await self.wait_idle()
        before = {s.name: cpu_seconds(s.pid) for s in self.servers}
        await trio.sleep(5.0)
        for s in self.servers:
            self.results.record(s, f"idle_rss_mib_{when}", rss_mib(s.pid))
            if when == "start":
                self.results.record(s, "idle_cpu_s", cpu_seconds(s.pid) - before[s.name])
