"""The scenarios: each runs once on one server and records its figures.

- ``streams``: n concurrent streams on ~50-token prompts (greedy, or seeded at
  ``--seed-temperature``): aggregate decode tok/s; at 1 stream also TTFT and decode tok/s,
  at 8 the inter-token latency percentiles;
- ``ttft``: one stream on a long prompt: time to first token;
- ``interference``: streams decode while a long prompt arrives: the longest gap they see
  until its first token;
- ``hangup``: hang up mid-prefill or mid-decode, then the server's CPU-seconds over the next
  5 s and the next request's time to first token.

Every prompt carries a fresh nonce, so no prompt cache answers it; a long prompt is built
once per repeat and sent to every server alike.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio
from bench_common import (
    aggregate_decode_rate,
    cpu_seconds,
    long_messages,
    percentile,
    story_messages,
)

from trioserve.testing import ServerProcess

from .client import StreamResult, chat_body, stream_chat
from .results import Results

CONCURRENCY = (1, 4, 8)
SCENARIOS = ("streams", "ttft", "seeded", "interference", "hangup")

Step = Callable[[ServerProcess], Awaitable[None]]


class Workloads:
    def __init__(
        self,
        args: argparse.Namespace,
        client: httpx.AsyncClient,
        count_tokens: Callable[[list[dict[str, str]]], int],
        results: Results,
    ) -> None:
        self.args = args
        self.client = client
        self.count_tokens = count_tokens
        self.results = results
        self._long_prompts: dict[str, tuple[list[dict[str, str]], int]] = {}

    def steps(self, rep: int) -> list[tuple[str, Step]]:
        """Repeat ``rep``'s runs, in order, as (label, run on one server); ``--scenarios``
        picks the groups."""
        steps: list[tuple[str, str, Step]] = []
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

    def long_prompt(self, tag: str, target: int) -> tuple[list[dict[str, str]], int]:
        """The same long prompt for every server within a repeat (built once)."""
        if tag not in self._long_prompts:
            self._long_prompts[tag] = long_messages(self.count_tokens, target, nonce=tag)
        return self._long_prompts[tag]

    async def stream(self, server: ServerProcess, body: dict[str, Any], **kw: Any) -> StreamResult:
        result = StreamResult()
        await stream_chat(
            self.client, server.url, body, result, limit_s=self.args.request_timeout, **kw
        )
        return result

    async def streams(self, server: ServerProcess, rep: int, n: int, seeded: bool) -> None:
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
                self.client, server.url, body, results[i], limit_s=self.args.request_timeout
            )

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        errors = [r.error for r in results if r.error]
        traces = [r.trace for r in results]
        agg = None if errors else aggregate_decode_rate(traces)
        kind = "seeded" if seeded else "greedy"
        record = self.results.record
        record(server, f"agg_{kind}_tps_{n}", agg)
        if n == 1 and not seeded:
            r = results[0]
            record(server, "ttft_short_s", r.trace.ttft, r.prompt_tokens)
            record(server, "decode_tps_1", None if errors else r.trace.decode_rate())
        if n == max(CONCURRENCY) and not seeded:
            gaps = [g * 1000 for t in traces for g in t.gaps()]
            record(server, "itl_p50_ms", None if errors else percentile(gaps, 50))
            record(server, "itl_p95_ms", None if errors else percentile(gaps, 95))
        self.results.detail(server, rep, f"streams_{kind}_{n}", results, aggregate_tps=agg)

    async def ttft(self, server: ServerProcess, rep: int, target: int) -> None:
        """One stream on a long prompt: time to first token."""
        messages, _ = self.long_prompt(f"r{rep}-ttft{target}", target)
        r = await self.stream(server, chat_body(messages, self.args.max_tokens))
        ttft = None if r.error else r.trace.ttft
        self.results.record(server, f"ttft_{target}_s", ttft, r.prompt_tokens)
        self.results.detail(server, rep, f"ttft_{target}", [r])

    async def interference(self, server: ServerProcess, rep: int) -> None:
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
                server.url,
                body,
                background[i],
                limit_s=args.request_timeout,
                on_token=started,
            )

        async def run_long(body: dict[str, Any]) -> None:
            await stream_chat(
                self.client,
                server.url,
                body,
                long_result,
                limit_s=args.request_timeout,
                on_token=first,
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
        self.results.record(
            server, "interference_gap_s", longest if covered else None, long_result.prompt_tokens
        )
        self.results.detail(
            server,
            rep,
            "interference",
            [*background, long_result],
            longest_gap_s=longest,
            covered=covered,
            long_ttft_s=long_result.trace.ttft,
        )

    async def disconnect(self, server: ServerProcess, rep: int, phase: str) -> None:
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
                    client,
                    server.url,
                    body,
                    result,
                    limit_s=args.request_timeout,
                    on_token=on_token,
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
        self.results.record(server, f"hangup_{phase}_cpu_s", cpu if as_planned else None)
        next_ttft = None if nxt.error else nxt.trace.ttft
        self.results.record(server, f"hangup_{phase}_next_ttft_s", next_ttft)
        self.results.detail(
            server, rep, f"hangup_{phase}", [result, nxt], cpu_s=cpu, as_planned=as_planned
        )
