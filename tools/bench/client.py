"""One streamed chat request, timed at the client.

Tokens are the SSE chunks with content, stamped as they arrive; the server's usage chunk
gives the token counts. Both servers speak the same OpenAI stream, so one reader serves both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from bench_common import TokenTrace

from trioserve.testing import SSEParser


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
    base_url: str,
    body: dict[str, Any],
    result: StreamResult,
    *,
    limit_s: float,
    on_token: Callable[[StreamResult], bool] | None = None,
    path: str = "/v1/chat/completions",
) -> StreamResult:
    """POST a streamed chat request and record, into ``result``, when each token arrives.

    ``on_token`` returning True hangs up (closes the connection). Cancelling the caller's
    scope hangs up too; ``result`` keeps what arrived until then. ``path``: another
    endpoint of the same stream shape (``/v1/completions``: tokens in ``choices[].text``).
    """
    result.trace.sent_at = time.perf_counter()
    try:
        with trio.move_on_after(limit_s) as scope:
            await _read_stream(client, base_url + path, body, result, on_token)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:  # a dead server, a broken stream
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    if scope.cancelled_caught:
        result.error = f"no complete answer within {limit_s:.0f} s"
    return result


async def _read_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    result: StreamResult,
    on_token: Callable[[StreamResult], bool] | None,
) -> None:
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        parser = SSEParser()
        async for text in resp.aiter_text():
            now = time.perf_counter()
            for event in parser.feed(text):
                if event.is_comment:
                    continue  # ': keepalive' heartbeats
                if event.is_done:
                    return
                chunk = event.json()
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return
                if _record(chunk, result):
                    result.trace.token_times.append(now)
                    if on_token is not None and on_token(result):
                        return  # leaving the block closes the connection: a hang-up


def _record(chunk: dict[str, Any], result: StreamResult) -> bool:
    """Note the chunk's usage and finish reason; True if it carries a token."""
    if chunk.get("usage"):
        result.trace.tokens = chunk["usage"].get("completion_tokens")
        result.prompt_tokens = chunk["usage"].get("prompt_tokens")
    got_token = False
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content") or choice.get("text"):
            got_token = True
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    return got_token
