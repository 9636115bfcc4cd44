"""Streams against a real server: the strict default, opt-in progress, no cross-talk."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import trio

from tests.integration.conftest import data_objects, parse_sse

CHAT = "/chat/completions"
LONG_PROMPT = "Summarize this text. " + " ".join(
    f"Sentence number {i} talks about the weather in a small town." for i in range(12)
)


def fresh(prompt: str) -> str:
    """The prompt behind a unique marker, so the prefix cache cannot skip its prefill."""
    return f"[{uuid.uuid4().hex[:8]}] {prompt}"


def chat_body(content: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


async def post_stream(server, body: dict, headers: dict | None = None) -> str:
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream(
            "POST", server.v1 + CHAT, json={**body, "stream": True}, headers=headers or {}
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            return (await response.aread()).decode()


async def test_default_stream_is_strict(server):
    raw = await post_stream(
        server,
        chat_body("What is the capital of France?", stream_options={"include_usage": True}),
    )
    lines = [line for line in raw.split("\n") if line.strip()]
    assert lines, "empty stream"
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    with_choices = [c for c in chunks if c["choices"]]
    finishes = [c for c in with_choices if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["finish_reason"] in {"stop", "length"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert "Paris" in text
    usage_chunks = [c for c in chunks if "usage" in c and c["usage"]]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    usage = usage_chunks[0]["usage"]
    assert usage_chunks[0]["choices"] == []
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_without_include_usage_has_no_usage_chunk(server):
    raw = await post_stream(server, chat_body("Say hi."))
    chunks = data_objects(raw)
    assert chunks and all(c["choices"] for c in chunks)
    assert not any(c.get("usage") for c in chunks)


def _progress_and_content(raw: str):
    events = parse_sse(raw)
    progress_idx = [i for i, (n, _) in enumerate(events) if n == "prefill_progress"]
    content_idx = [
        i
        for i, (n, d) in enumerate(events)
        if n is None and d != "[DONE]" and json.loads(d)["choices"]
    ]
    return events, progress_idx, content_idx


async def test_opted_in_stream_reports_prefill_progress_as_valid_chunks(server):
    raw = await post_stream(
        server, chat_body(fresh(LONG_PROMPT)), headers={"X-SwiftLM-Prefill-Progress": "true"}
    )
    events, progress_idx, content_idx = _progress_and_content(raw)
    # ~150 prompt tokens in 16-token chunks: many chunk-completion events.
    assert len(progress_idx) >= 2, raw[:2000]
    assert content_idx, "no content"
    assert max(progress_idx) < min(content_idx), "progress after content"
    progress = [json.loads(events[i][1]) for i in progress_idx]
    first = json.loads(events[content_idx[0]][1])
    for p in progress:
        assert p["object"] == "chat.completion.chunk"
        assert p["choices"] == []
        assert p["id"] == first["id"] and p["created"] == first["created"]
        assert p["n_prompt_tokens"] == progress[0]["n_prompt_tokens"]
        assert 0.0 <= p["fraction"] <= 1.0
        assert p["elapsed_seconds"] >= 0
    n_past = [p["n_past"] for p in progress]
    assert n_past == sorted(n_past)
    assert [p["fraction"] for p in progress] == sorted(p["fraction"] for p in progress)
    assert progress[-1]["fraction"] == 1.0
    assert progress[-1]["n_past"] == progress[-1]["n_prompt_tokens"]
    assert events[-1] == (None, "[DONE]")


@pytest.mark.parametrize(
    ("header", "value", "opted_in"),
    [
        ("X-SwiftLM-Prefill-Progress", "true", True),
        ("X-SwiftLM-Prefill-Progress", "TRUE", True),
        ("X-SwiftLM-Prefill-Progress", "1", True),
        ("X-SwiftLM-Prefill-Progress", "yes", True),
        ("X-SwiftLM-Prefill-Progress", "On", True),
        ("X-Trioserve-Prefill-Progress", "true", True),
        ("X-SwiftLM-Prefill-Progress", "false", False),
        ("X-SwiftLM-Prefill-Progress", "0", False),
        ("X-SwiftLM-Prefill-Progress", "", False),
        ("X-SwiftLM-Prefill-Progress", "maybe", False),
    ],
)
async def test_progress_header_truthy_values(server, header, value, opted_in):
    raw = await post_stream(
        server, chat_body("Name a colour.", max_tokens=3), headers={header: value}
    )
    names = {n for n, _ in parse_sse(raw)}
    assert ("prefill_progress" in names) is opted_in
    assert parse_sse(raw)[-1] == (None, "[DONE]")


async def test_concurrent_opted_in_streams_report_their_own_prompt(server):
    prompts = {"short": fresh("Name a colour."), "long": fresh(LONG_PROMPT)}
    results: dict[str, str] = {}

    async def run(name: str) -> None:
        results[name] = await post_stream(
            server,
            chat_body(prompts[name], max_tokens=6, stream_options={"include_usage": True}),
            headers={"X-SwiftLM-Prefill-Progress": "1"},
        )

    async with trio.open_nursery() as nursery:
        for name in prompts:
            nursery.start_soon(run, name)
    totals = {}
    for name, raw in results.items():
        events = parse_sse(raw)
        assert events[-1] == (None, "[DONE]"), f"{name} did not complete"
        chunks = data_objects(raw)
        usage = next(c["usage"] for c in chunks if c.get("usage"))
        progress = [json.loads(d) for n, d in events if n == "prefill_progress"]
        assert progress, f"{name}: no progress events"
        assert {p["n_prompt_tokens"] for p in progress} == {usage["prompt_tokens"]}
        totals[name] = usage["prompt_tokens"]
    assert totals["long"] > totals["short"] * 3


async def test_completions_stream(server):
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream(
            "POST",
            server.v1 + "/completions",
            json={"prompt": "The capital of France is", "max_tokens": 5, "stream": True},
        ) as response:
            raw = (await response.aread()).decode()
    chunks = data_objects(raw)
    assert chunks[0]["object"] == "text_completion"
    assert parse_sse(raw)[-1] == (None, "[DONE]")
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).strip()
