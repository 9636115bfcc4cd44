"""The official openai SDK, sync and async, reads every answer shape, checked field by field.

Each shape has one checker used by both clients: streamed chat (with and without
``include_usage``), chat that is not streamed, completions, the models list, and errors
(a bad request raises the SDK's ``BadRequestError`` carrying our message and field).
"""

from __future__ import annotations

import openai
import pytest

from tests.integration.test_streaming import LONG_PROMPT, fresh

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FINISHES = {"stop", "length"}


@pytest.fixture
def sync_client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _check_stream(chunks, with_usage: bool) -> str:
    assert chunks, "no chunks"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {MODEL}
    assert len({c.created for c in chunks}) == 1 and chunks[0].created > 0
    content = [c for c in chunks if c.choices]
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 for c in content)
    assert content[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in FINISHES
    assert content[-1].choices[0].finish_reason == finishes[0], "content after the finish"
    usage = [c.usage for c in chunks if c.usage]
    if with_usage:
        # One usage chunk, the last one, with no choices.
        assert len(usage) == 1 and chunks[-1].usage is not None and not chunks[-1].choices
        u = usage[0]
        assert u.prompt_tokens > 0 and u.completion_tokens >= 1
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    else:
        assert not usage
    return "".join(c.choices[0].delta.content or "" for c in content)


def _check_usage(usage) -> None:
    assert usage.prompt_tokens > 0 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def _check_chat(chat) -> None:
    assert chat.id.startswith("chatcmpl-")
    assert chat.object == "chat.completion"
    assert chat.model == MODEL and chat.created > 0
    assert len(chat.choices) == 1
    choice = chat.choices[0]
    assert choice.index == 0 and choice.finish_reason in FINISHES
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert not choice.message.tool_calls
    _check_usage(chat.usage)


def _check_completion(completion) -> None:
    assert completion.id
    assert completion.object == "text_completion"
    assert completion.model == MODEL and completion.created > 0
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason in FINISHES
    assert choice.text.strip()
    _check_usage(completion.usage)


def _check_models(models) -> None:
    assert [m.id for m in models.data] == [MODEL]
    model = models.data[0]
    assert model.object == "model" and model.owned_by == "trioserve"
    assert isinstance(model.created, int)


def _check_bad_request(error: openai.BadRequestError, param: str, words: str) -> None:
    assert error.status_code == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert words in error.message


CHAT = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5}


@pytest.mark.parametrize("with_usage", [True, False])
def test_sync_streamed_chat(sync_client, with_usage):
    options = {"include_usage": True} if with_usage else None
    stream = sync_client.chat.completions.create(**CHAT, stream=True, stream_options=options)
    assert "Paris" in _check_stream(list(stream), with_usage)


@pytest.mark.parametrize("with_usage", [True, False])
async def test_async_streamed_chat(async_client, with_usage):
    options = {"include_usage": True} if with_usage else None
    stream = await async_client.chat.completions.create(**CHAT, stream=True, stream_options=options)
    chunks = [chunk async for chunk in stream]
    assert "Paris" in _check_stream(chunks, with_usage)


def test_sync_chat_and_completion_and_models(sync_client):
    _check_chat(sync_client.chat.completions.create(**CHAT))
    _check_completion(sync_client.completions.create(**COMPLETION, temperature=0))
    _check_models(sync_client.models.list())


async def test_async_chat_and_completion_and_models(async_client):
    _check_chat(await async_client.chat.completions.create(**CHAT))
    _check_completion(await async_client.completions.create(**COMPLETION, temperature=0))
    _check_models(await async_client.models.list())


@pytest.mark.parametrize(
    ("field", "value", "words"), [("n", 2, "only n=1"), ("temperature", 7, "temperature")]
)
def test_sync_bad_request_raises_bad_request_error(sync_client, field, value, words):
    with pytest.raises(openai.BadRequestError) as info:
        sync_client.chat.completions.create(model=MODEL, messages=QUESTION, **{field: value})
    _check_bad_request(info.value, field, words)


@pytest.mark.parametrize(
    ("field", "value", "words"), [("n", 2, "only n=1"), ("temperature", 7, "temperature")]
)
async def test_async_bad_request_raises_bad_request_error(async_client, field, value, words):
    with pytest.raises(openai.BadRequestError) as info:
        await async_client.chat.completions.create(model=MODEL, messages=QUESTION, **{field: value})
    _check_bad_request(info.value, field, words)


def test_sdk_reads_an_opted_in_stream_when_skipping_empty_choices(sync_client):
    stream = sync_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": fresh(LONG_PROMPT)}],
        max_tokens=6,
        stream=True,
        extra_headers={"X-SwiftLM-Prefill-Progress": "true"},
    )
    chunks = list(stream)
    progress = [c for c in chunks if not c.choices]
    assert len(progress) >= 2, "expected progress chunks to reach the SDK as chunks"
    # The progress fields reach the caller as the chunk's extra fields.
    extras = [c.model_extra for c in progress]
    assert all(e["status"] in {"queued", "processing"} for e in extras), extras
    assert extras[-1]["fraction"] == 1.0 and extras[-1]["n_past"] == extras[-1]["n_prompt_tokens"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
