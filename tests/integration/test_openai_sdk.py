"""The official openai SDK, sync and async, reads every answer shape."""

from __future__ import annotations

import openai
import pytest

from tests.integration.test_streaming import LONG_PROMPT

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def sync_client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _check_stream(chunks, with_usage: bool) -> str:
    assert chunks, "no chunks"
    assert len({c.id for c in chunks}) == 1
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert finishes and finishes[-1] in {"stop", "length"}
    usage = [c.usage for c in chunks if c.usage]
    if with_usage:
        assert len(usage) == 1 and usage[0].completion_tokens >= 1
    else:
        assert not usage
    return "".join(c.choices[0].delta.content or "" for c in content)


@pytest.mark.parametrize("with_usage", [True, False])
def test_sync_streamed_chat(sync_client, with_usage):
    options = {"include_usage": True} if with_usage else None
    stream = sync_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options=options,
    )
    assert "Paris" in _check_stream(list(stream), with_usage)


@pytest.mark.parametrize("with_usage", [True, False])
async def test_async_streamed_chat(async_client, with_usage):
    options = {"include_usage": True} if with_usage else None
    stream = await async_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options=options,
    )
    chunks = [chunk async for chunk in stream]
    assert "Paris" in _check_stream(chunks, with_usage)


def test_sync_chat_and_completion_and_models(sync_client):
    chat = sync_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=12, temperature=0
    )
    assert chat.object == "chat.completion"
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    completion = sync_client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text.strip()
    assert completion.usage.completion_tokens >= 1
    models = sync_client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


async def test_async_chat_and_completion_and_models(async_client):
    chat = await async_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=12, temperature=0
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason in {"stop", "length"}
    completion = await async_client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
    )
    assert completion.choices[0].text.strip()
    models = await async_client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_sync_bad_request_raises_bad_request_error(sync_client):
    with pytest.raises(openai.BadRequestError) as info:
        sync_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, n=2)
    assert "n=1" in str(info.value) or "only n" in str(info.value)


async def test_async_bad_request_raises_bad_request_error(async_client):
    with pytest.raises(openai.BadRequestError) as info:
        await async_client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=7
        )
    assert "temperature" in str(info.value)


def test_sdk_reads_an_opted_in_stream_when_skipping_empty_choices(sync_client):
    stream = sync_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=6,
        stream=True,
        extra_headers={"X-SwiftLM-Prefill-Progress": "true"},
    )
    chunks = list(stream)
    progress = [c for c in chunks if not c.choices]
    assert len(progress) >= 2, "expected progress chunks to reach the SDK as chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
