"""Prefix cache benchmark: time to first token of a conversation's second turn.

Agentic clients resend the whole conversation every turn. This starts trioserve on loopback,
sends a fresh ~1750-token first turn, then the second turn (history + answer + a short
question), and prints both times to first token, the cached token count and their ratio
(issue 6 goal: second turn <= 0.2x the first). Bounded: 2 conversations, then it stops.

    .venv/bin/python tools/bench_prefix.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import time
import uuid

import httpx

from trioserve.testing import iter_events, running_server


def turn(base: str, messages: list[dict]) -> tuple[float, str, dict]:
    """Stream one answer; return (time to first token, text, usage)."""
    started = time.monotonic()
    first, text, usage = None, "", {}
    body = {
        "messages": messages,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as response:
        for event in iter_events(response.iter_text()):
            if event.is_comment or event.is_done:
                continue
            chunk = event.json()
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.monotonic() - started
                text += chunk["choices"][0]["delta"]["content"]
    if first is None:
        raise SystemExit("no content came back")
    return first, text, usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with running_server("--log-level", "warning", die_with_parent=True) as server:
        base = server.url
        for _ in range(args.repeat):
            history = f"[{uuid.uuid4().hex}] " + " ".join(
                f"Note {i}: the meeting about topic {i} moved to room {i % 7}." for i in range(95)
            )
            first_turn = [{"role": "user", "content": history + " Summarize."}]
            t1, answer, u1 = turn(base, first_turn)
            second_turn = [
                *first_turn,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Which room is topic 3 in?"},
            ]
            t2, _, u2 = turn(base, second_turn)
            cached = u2["prompt_tokens_details"]["cached_tokens"]
            print(
                f"turn 1: TTFT {t1:.2f} s, {u1['prompt_tokens']} prompt tokens | "
                f"turn 2: TTFT {t2:.2f} s, {u2['prompt_tokens']} prompt tokens, {cached} cached"
                f" | ratio {t2 / t1:.3f} (goal <= 0.2)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
