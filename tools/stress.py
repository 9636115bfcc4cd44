"""Stress trioserve with random disconnects, then prove nothing leaked.

M clients hammer a ``--parallel 4`` server for T seconds on loopback. Each request picks at
random: streamed or not, opted in to prefill progress or not, and whether and when it hangs
up (queued, prefill, decode, or never). Some requests the server fails on purpose: with
``--fault-rate`` it runs as ``python -m trioserve.testing.faults`` (the production server
whose worker has one component raise at its real seam for a request whose id names
``fault-<kind>``), and some clients stop reading mid-stream with the socket open, which
the server must drop after its ``--send-timeout``; a small ``--max-queue`` and
``--queue-timeout`` make the overload answers (429, queue timeout) happen too.

Afterwards the tool checks, through the server's ``/debug/state`` (``--debug-endpoints``),
that every slot is free, no sequence is left in the batch, the Trio task count and the thread
count are back to their idle baseline, and RSS grew less than 10 %; that every stream that
finished was well formed; and that the server still answers. It prints a summary, with a
figure for each fault, and exits 1 on any leak or malformed stream.

    python tools/stress.py                      # 32 clients, 60 s, starts its own server
    python tools/stress.py --clients 8 --duration 20
    python tools/stress.py --url http://127.0.0.1:8080   # a running --debug-endpoints server

Loopback only, bounded in time and in requests, and it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import h11
import httpx
import trio

from trioserve.testing import (
    Event,
    SSEParser,
    free_port,
    parse_events,
    running_server,
    start_server,
)

PHASES = ("never", "queued", "prefill", "decode")
SHORT = "Name three colours."
LONG = "Summarize this text. " + " ".join(
    f"Sentence {i} is about a walk in the park on a sunny day." for i in range(40)
)
PROGRESS_HEADER = {"X-SwiftLM-Prefill-Progress": "true"}
# The started server drops a stream whose client reads nothing for this long.
SEND_TIMEOUT_S = 2.0
# Faults that fail the request on its own (trioserve.testing.faults), in prefill or decode.
STRESS_FAULTS = ("prefill", "decode", "detokenizer")
# A stalled client that the server has not dropped after this long counts as a failure.
STALL_LIMIT_S = 30.0
# A stalled client: greedy, this runs to max_tokens, and logprobs make ~3 KB frames, so the
# socket buffers fill within a few tokens of the client going quiet.
STALL_BODY = {
    "messages": [
        {
            "role": "user",
            "content": "Write the numbers from 1 to 500 on one line, separated by commas, "
            "with nothing else.",
        }
    ],
    "temperature": 0,
    "max_tokens": 2000,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 20,
}


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    started: int = 0
    stall_drops_s: list[float] = field(default_factory=list)  # stall start to slot freed


@dataclass(frozen=True)
class Plan:
    streamed: bool
    progress: bool
    hang_up: str  # one of PHASES
    long_prompt: bool
    fault: str | None = None  # a trioserve.testing.faults kind the server fails it with
    stall: bool = False  # stops reading once content flows, socket left open


def random_plan(rng: random.Random, fault_rate: float = 0.0, stall_rate: float = 0.0) -> Plan:
    # "never" twice as likely as each hang-up phase: completions, injected faults and stalls
    # all come out of the requests that do not hang up.
    hang_up = rng.choices(PHASES, weights=(2, 1, 1, 1))[0]
    fault = None
    if hang_up == "never" and rng.random() < fault_rate:
        fault = rng.choice(STRESS_FAULTS)
    stall = hang_up == "never" and fault is None and rng.random() < stall_rate
    return Plan(
        streamed=stall or rng.random() < 0.7,
        progress=rng.random() < 0.5,
        hang_up=hang_up,
        long_prompt=hang_up in {"prefill", "queued"} or rng.random() < 0.3,
        fault=fault,
        stall=stall,
    )


def fault_headers(plan: Plan, rng: random.Random) -> dict[str, str]:
    if plan.fault is None:
        return {}
    return {"X-Request-Id": f"stress-{rng.getrandbits(48):x}-fault-{plan.fault}"}


def reported_error(raw: str) -> str | None:
    """The code of the error chunk right before [DONE], if the stream ended with one."""
    events = parse_events(raw)
    if len(events) < 2 or not events[-1].is_done:
        return None
    last = events[-2]
    if last.is_comment or last.name is not None:
        return None
    chunk = last.json()
    return chunk["error"].get("code") if "error" in chunk else None


def body_for(plan: Plan, rng: random.Random) -> dict:
    return {
        "messages": [{"role": "user", "content": LONG if plan.long_prompt else SHORT}],
        "max_tokens": rng.randint(8, 40),
        "temperature": 0,
        "stream": plan.streamed,
        "stream_options": {"include_usage": True} if plan.streamed else None,
    }


def check_stream(raw: str) -> str | None:
    """None if the stream is well formed, else what is wrong with it."""
    parser = SSEParser()
    events = parser.feed(raw)
    if parser.pending or not events or not events[-1].is_done:
        return "does not end with data: [DONE]"
    ids, seen_content, finish = set(), False, None
    for event in events[:-1]:
        if event.is_comment:
            return f"a block without data: {event.comments!r}"
        chunk = event.json()
        if "error" in chunk:
            return f"error chunk: {chunk['error'].get('message')}"
        ids.add(chunk["id"])
        if event.name == "prefill_progress":
            if seen_content or chunk["choices"] != []:
                return "a progress event after content, or with choices"
        elif chunk["choices"]:
            seen_content = True
            finish = chunk["choices"][0].get("finish_reason") or finish
    if len(ids) != 1:
        return f"{len(ids)} ids in one stream"
    if finish not in {"stop", "length"}:
        return "no finish_reason chunk"
    return None


def _chunk(event: Event) -> dict:
    """The event's JSON object; {} for a comment, [DONE] or what is not JSON (check_stream
    reports those for the streams that run to their end)."""
    try:
        chunk = event.json()
    except ValueError:
        return {}
    return chunk if isinstance(chunk, dict) else {}


def has_content(event: Event) -> bool:
    choices = _chunk(event).get("choices") or ()
    return any((choice.get("delta") or {}).get("content") for choice in choices)


def is_queued(event: Event) -> bool:
    """The heartbeat of a request waiting for a slot (an opted-in progress event)."""
    return event.name == "prefill_progress" and _chunk(event).get("status") == "queued"


async def run_streamed(
    client: httpx.AsyncClient, url: str, plan: Plan, body: dict, headers: dict
) -> str:
    headers = {**headers, **(PROGRESS_HEADER if plan.progress else {})}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code == 429:
            return "rejected_429"
        if response.status_code != 200:
            return f"http_{response.status_code}"
        if plan.hang_up == "queued" and not plan.progress:
            return "hung_up_queued"  # right after the headers: queued or just admitted
        raw, parser = "", SSEParser()
        async for text in response.aiter_text():
            raw += text
            for event in parser.feed(text):
                if plan.hang_up == "queued" and is_queued(event):
                    return "hung_up_queued"
                if plan.hang_up == "prefill" and (
                    event.name == "prefill_progress" or not plan.progress
                ):
                    return "hung_up_prefill"
                if plan.hang_up in {"decode", "queued"} and has_content(event):
                    return f"hung_up_{plan.hang_up}"
        code = reported_error(raw)
        if code in {"queue_timeout", "queue_full"}:  # queue_full: it filled after the headers
            return code  # before any fault could be injected
        if plan.fault is not None:
            ok = code == "generation_failed"
            return "fault_reported" if ok else "malformed: injected fault not reported"
        problem = check_stream(raw)
        return "completed" if problem is None else f"malformed: {problem}"


async def run_plain(
    client: httpx.AsyncClient, url: str, plan: Plan, body: dict, rng, headers: dict
) -> str:
    if plan.hang_up == "never":
        response = await client.post(url, json=body, headers=headers)
        payload = response.json()
        if response.status_code == 429:
            code = payload["error"]["code"]
            return "queue_timeout" if code == "queue_timeout" else "rejected_429"
        if plan.fault is not None:
            ok = response.status_code == 500 and payload["error"]["code"] == "generation_failed"
            return "fault_reported" if ok else "malformed: injected fault not reported"
        if response.status_code != 200 or not payload.get("choices"):
            return f"malformed: http {response.status_code} {str(payload)[:120]}"
        return "completed"
    with trio.move_on_after(rng.uniform(0.05, 1.5)):
        response = await client.post(url, json=body)
        return "rejected_429" if response.status_code == 429 else "completed_before_hang_up"
    return f"hung_up_plain_{plan.hang_up}"


async def run_stalled(base: str, rng: random.Random, tally: Tally) -> str:
    """Read until content flows, then read nothing, socket open, until the server drops it.

    The server must drop the stream (``--send-timeout``, or the kernel's TCP_USER_TIMEOUT)
    rather than buffer what the client does not read: the request leaves ``/debug/state``,
    and reading again yields what was buffered and an end without ``[DONE]``.
    """
    url = httpx.URL(base)
    request_id = f"stall-{rng.getrandbits(48):x}"
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills within a few frames
    await sock.connect((url.host, url.port))
    connection = h11.Connection(h11.CLIENT)
    body = json.dumps(STALL_BODY).encode()
    headers = [("Host", url.host), ("Content-Type", "application/json")]
    headers += [("Content-Length", str(len(body))), ("X-Request-Id", request_id)]
    request = h11.Request(method="POST", target="/v1/chat/completions", headers=headers)
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(
            connection.send(request) + connection.send(h11.Data(data=body))
            + connection.send(h11.EndOfMessage())
        )  # fmt: skip
        raw, status = b"", None

        async def read_some() -> bool:
            """One event from the server; False once the response or connection ended."""
            nonlocal raw, status
            while (event := connection.next_event()) is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                raw += event.data
            return isinstance(event, (h11.Response, h11.Data))  # else ended (or PAUSED after)

        def content_flows() -> bool:
            return b'"content":"' in raw.replace(b'"content":""', b"")

        try:
            while not content_flows() and await read_some():
                pass
            if status != 200:
                return "rejected_429" if status == 429 else f"http_{status}"
            if not content_flows():  # ended before any content: queue timeout or full
                code = reported_error(raw.decode())
                return code if code in {"queue_timeout", "queue_full"} else "malformed: no content"
            stalled_at = trio.current_time()
            with trio.move_on_after(STALL_LIMIT_S) as waited:  # the stall: nothing read
                # Polling another process: no Trio event crosses it.
                while request_id in (await debug_state(base))["requests"]:  # noqa: ASYNC110
                    await trio.sleep(0.25)
            if waited.cancelled_caught:
                return f"malformed: a stalled stream kept its slot {STALL_LIMIT_S:g} s"
            tally.stall_drops_s.append(trio.current_time() - stalled_at)
            with trio.move_on_after(60) as waited:
                while await read_some():
                    pass
            if waited.cancelled_caught:
                return "malformed: a dropped stream was still sending 60 s later"
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass  # reset, or closed before the response was complete: dropped
    if b"data: [DONE]" in raw:
        return "malformed: the stalled stream was not dropped"
    return "dropped_stalled"


async def client_loop(
    base: str,
    deadline: float,
    seed: int,
    tally: Tally,
    limit: int,
    fault_rate: float = 0.0,
    stall_rate: float = 0.0,
) -> None:
    rng = random.Random(seed)
    url = base + "/v1/chat/completions"
    stall_again = False  # a stall turned away by the queue is tried again
    async with httpx.AsyncClient(timeout=120) as client:
        while trio.current_time() < deadline and tally.started < limit:
            tally.started += 1
            plan = random_plan(rng, fault_rate, stall_rate)
            if stall_again:
                plan = Plan(True, False, "never", long_prompt=False, stall=True)
            body = body_for(plan, rng)
            headers = fault_headers(plan, rng)
            try:
                if plan.stall:
                    outcome = await run_stalled(base, rng, tally)
                elif plan.streamed:
                    outcome = await run_streamed(client, url, plan, body, headers)
                else:
                    outcome = await run_plain(client, url, plan, body, rng, headers)
            except httpx.HTTPError as exc:
                outcome = f"transport_error: {type(exc).__name__}: {exc}"
            kind = "stall" if plan.stall else "stream" if plan.streamed else "plain"
            tally.outcomes[(kind, outcome.split(":")[0])] += 1
            if outcome.startswith(("malformed", "transport_error", "http_")):
                tally.malformed.append(f"{kind} {plan}: {outcome}")
            rejected = outcome in {"rejected_429", "queue_full", "queue_timeout"}
            stall_again = plan.stall and rejected
            if rejected:
                # Back off, as a client honouring Retry-After would (the server says 2-5 s;
                # shorter here to keep the pressure on).
                await trio.sleep(rng.uniform(0.5, 2.0))


async def debug_state(base: str) -> dict:
    # A fresh connection each time, closed at once, so the count of connection tasks
    # is the same for the baseline and for the final reading.
    async with httpx.AsyncClient(timeout=10, headers={"Connection": "close"}) as client:
        return (await client.get(base + "/debug/state")).json()


async def settle(base: str, baseline: dict, timeout_s: float = 10.0) -> dict:
    """Wait for the server to go idle again; return the last reading."""
    deadline = trio.current_time() + timeout_s
    while True:
        state = await debug_state(base)
        idle = state["slots_busy"] == 0 and state["in_batch"] == 0 and state["queue_length"] == 0
        # The worker hands its buffers back only once it goes idle: read RSS after that.
        idle = idle and state.get("worker_idle", True)
        if idle and state["tasks"] <= baseline["tasks"] and state["threads"] <= baseline["threads"]:
            return state
        if trio.current_time() > deadline:
            return state
        await trio.sleep(0.2)


async def storm(
    args: argparse.Namespace, base: str, seconds: float, seed: int, tally: Tally
) -> None:
    """``args.clients`` clients for ``seconds``, client i drawing its plans from ``seed + i``."""
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(args.clients):
            nursery.start_soon(
                client_loop,
                base,
                deadline,
                seed + i,
                tally,
                args.max_requests,
                args.fault_rate,
                args.stall_rate,
            )


async def warm_up(args: argparse.Namespace, base: str) -> None:
    """A short storm of the same kind first, so the baseline is taken at a working size
    (MLX's buffers, the allocator's arenas, Python's caches), not on a cold process."""
    await storm(args, base, args.warmup, 10_000, Tally())


def unaccounted(state: dict) -> int:
    """RSS less the prefix cache: memory kept on purpose, bounded by --prefix-cache-mb."""
    return state["rss_bytes"] - state.get("prefix_cache_bytes", 0)


def rss_growth(baseline: dict, state: dict) -> float:
    """Unaccounted RSS growth since the baseline, as a fraction of the baseline."""
    return (unaccounted(state) - unaccounted(baseline)) / max(unaccounted(baseline), 1)


def check_leaks(
    baseline: dict, final: dict, confirm: dict | None = None
) -> list[tuple[str, str, bool]]:
    """``confirm``: the reading after a second storm, taken when the first grew RSS by 10 %
    or more. A leak grows with every storm; a one-off rise of the allocator's high-water
    mark (several long prompts prefilled at once for the first time) does not. So RSS fails
    only if it also grew over the second storm by at least half as much (and 5 %)."""
    growth = rss_growth(baseline, final)
    rss_text = (
        f"{growth:+.1%} ({unaccounted(baseline) >> 20} -> {unaccounted(final) >> 20} MiB"
        f" + {final.get('prefix_cache_bytes', 0) >> 20} MiB prefix cache)"
    )
    rss_ok = growth < 0.10
    if confirm is not None:
        again = rss_growth(baseline, confirm) - growth
        rss_ok = again < max(0.05, growth / 2)
        rss_text += f"; a second storm: {again:+.1%} more ({unaccounted(confirm) >> 20} MiB)"
    last = confirm or final  # slots, tasks and threads as the server stands at the end
    return [
        ("slots free", f"{last['slots_busy']} busy", last["slots_busy"] == 0),
        ("batch empty", f"{last['in_batch']} in batch", last["in_batch"] == 0),
        ("queue empty", f"{last['queue_length']} queued", last["queue_length"] == 0),
        (
            "trio tasks",
            f"{baseline['tasks']} -> {last['tasks']}",
            last["tasks"] <= baseline["tasks"],
        ),
        (
            "threads",
            f"{baseline['threads']} -> {last['threads']}",
            last["threads"] == baseline["threads"],
        ),
        ("rss growth < 10%", rss_text, rss_ok),
    ]


async def stress(args: argparse.Namespace, base: str) -> int:
    await warm_up(args, base)
    baseline = await settle(base, {"tasks": 10**9, "threads": 10**9})
    tally = Tally()
    started = time.monotonic()
    await storm(args, base, args.duration, args.seed, tally)
    storm_s = time.monotonic() - started
    final = await settle(base, baseline)
    confirm = None
    if rss_growth(baseline, final) >= 0.10:  # a leak, or a one-off high-water mark?
        again = Tally()
        await storm(args, base, args.duration, args.seed + 1_000, again)
        tally.malformed.extend(again.malformed)
        confirm = await settle(base, baseline)
    checks = check_leaks(baseline, final, confirm)
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            base + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": SHORT}], "max_tokens": 5},
        )
    checks.append(("still answers", f"HTTP {response.status_code}", response.status_code == 200))
    checks.append(("well-formed", f"{len(tally.malformed)} bad", not tally.malformed))
    print_report(args, tally, checks, storm_s)
    return 0 if all(ok for _, _, ok in checks) else 1


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[0]:.1f}-{ordered[-1]:.1f} (median {ordered[len(ordered) // 2]:.1f})"


def fault_figures(tally: Tally) -> list[tuple[str, str]]:
    """The faults the storm provoked and how each was answered."""

    def count(*outcomes: str, kinds: tuple[str, ...] = ("plain", "stream", "stall")) -> int:
        return sum(tally.outcomes[(kind, outcome)] for kind in kinds for outcome in outcomes)

    injected = sum(
        n for (kind, outcome), n in tally.outcomes.items() if outcome == "fault_reported"
    )
    stalled = sum(
        n for (kind, outcome), n in tally.outcomes.items()
        if kind == "stall" and outcome not in {"rejected_429", "queue_full", "queue_timeout"}
    )  # fmt: skip
    return [
        ("model faults injected, reported as clean errors", f"{injected}"),
        ("stalled readers dropped by the server", f"{count('dropped_stalled')} of {stalled}"),
        ("  seconds from the stall to the freed slot", spread(tally.stall_drops_s)),
        ("rejected with 429 (queue full)", f"{count('rejected_429')}"),
        ("  queue full after the headers: error chunk", f"{count('queue_full')}"),
        ("queue timeouts answered with an error", f"{count('queue_timeout')}"),
    ]


def print_report(args, tally: Tally, checks, storm_s: float) -> None:
    print(f"\n{tally.started} requests from {args.clients} clients in {storm_s:.1f} s")
    print(f"{'kind':<8} {'outcome':<28} {'count':>6}")
    for (kind, outcome), count in sorted(tally.outcomes.items()):
        print(f"{kind:<8} {outcome:<28} {count:>6}")
    print(f"\n{'fault or overload':<46} count")
    for label, count in fault_figures(tally):
        print(f"{label:<46} {count:>5}")
    print(f"\n{'check':<18} {'reading':<44} result")
    for name, reading, ok in checks:
        print(f"{name:<18} {reading:<44} {'ok' if ok else 'LEAK/FAIL'}")
    for problem in tally.malformed[:10]:
        print("  bad:", problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up load")
    parser.add_argument("--max-requests", type=int, default=5000, help="hard cap on requests")
    parser.add_argument("--prefix-cache-mb", type=int, default=512, help="for the started server")
    parser.add_argument("--parallel", type=int, default=4, help="slots of the started server")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.05,
        help="share of requests the started server fails on purpose, at a real seam of its "
        "worker (trioserve.testing.faults: a raising logits processor or detokenizer); "
        "each must come back as a clean error",
    )
    parser.add_argument(
        "--stall-rate",
        type=float,
        default=0.05,
        help="share of requests whose client stops reading mid-stream with the socket open; "
        f"the started server (--send-timeout {SEND_TIMEOUT_S:g}) must drop each",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        help="queue bound of the started server; beyond it requests get 429 (default: half "
        "the clients)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=5.0,
        help="seconds a request of the started server may wait for a slot (default: %(default)s)",
    )
    parser.add_argument("--url", help="a running server with --debug-endpoints (loopback)")
    args = parser.parse_args(argv)
    if args.max_queue is None:
        args.max_queue = max(1, args.clients // 2)
    if args.url:
        host = httpx.URL(args.url).host
        if host not in {"127.0.0.1", "localhost", "::1"}:
            raise SystemExit("loopback only: --url must point at 127.0.0.1 or localhost")
        args.fault_rate = 0.0  # a server we did not start injects no faults
        args.stall_rate = 0.0  # nor our short --send-timeout
        return trio.run(stress, args, args.url.rstrip("/"))
    server_args = [
        "--parallel", str(args.parallel), "--prefill-step-size", "64", "--debug-endpoints",
        "--log-level", "warning", "--prefix-cache-mb", str(args.prefix_cache_mb),
        "--send-timeout", str(SEND_TIMEOUT_S), "--max-queue", str(args.max_queue),
        "--queue-timeout", str(args.queue_timeout),
    ]  # fmt: skip
    if args.fault_rate <= 0:
        with running_server(*server_args, die_with_parent=True) as server:
            return trio.run(stress, args, server.url)
    port = free_port()
    argv = [sys.executable, "-m", "trioserve.testing.faults", "--port", str(port), *server_args]
    server = start_server(argv, port, die_with_parent=True)
    try:
        return trio.run(stress, args, server.url)
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
