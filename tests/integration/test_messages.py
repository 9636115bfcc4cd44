"""``/v1/messages`` with the official anthropic SDK (sync and async), checked field by field,
and the same cancellation guarantees as the other dialects on this endpoint."""

from __future__ import annotations

import anthropic
import httpx
import pytest
import trio

from tests.integration.test_disconnect import logged_abort, new_request_id, wait_slots_free

MODEL = "SmolLM2-135M-Instruct"
# anthropic 2.x no longer takes temperature as an argument; the API still does.
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0)


def _check_text_message(message, *, model: str = MODEL) -> str:
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == model
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("end_turn", "max_tokens")
    # Anthropic counts prompt tokens served from the (prefix) cache apart.
    usage = message.usage
    assert usage.input_tokens >= 1 and usage.cache_read_input_tokens >= 0
    assert usage.input_tokens + usage.cache_read_input_tokens > 5 and usage.output_tokens > 0
    return block.text


def test_a_whole_answer_sync(client):
    message = client.messages.create(
        model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY
    )
    assert "Paris" in _check_text_message(message)
    assert message.stop_reason == "end_turn"


async def test_a_whole_answer_async_with_a_system_prompt(async_client):
    message = await async_client.messages.create(
        model=MODEL,
        max_tokens=40,
        system=[
            {
                "type": "text",
                "text": "You are a helpful AI assistant.",
                "cache_control": {"type": "ephemeral"},
            }
        ],
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}],
        extra_body=GREEDY,
    )
    assert "Paris" in _check_text_message(message)


def test_a_streamed_answer_through_the_stream_helper(client):
    with client.messages.stream(
        model=MODEL,
        max_tokens=40,
        messages=QUESTION,
        extra_body=GREEDY,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == _check_text_message(final) and "Paris" in text


async def test_a_raw_stream_has_anthropics_event_sequence(async_client):
    stream = await async_client.messages.create(
        model=MODEL, max_tokens=40, messages=QUESTION, extra_body=GREEDY, stream=True
    )
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens > 5
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert "Paris" in "".join(deltas)
    assert events[-2].delta.stop_reason == "end_turn"
    assert events[-2].usage.output_tokens > 0


def test_max_tokens_and_stop_sequences_give_their_stop_reasons(client):
    cut = client.messages.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Tell a story."}]
    )
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    stopped = client.messages.create(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Count from 1 to 10."}],
        stop_sequences=["4"],
        extra_body=GREEDY,
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "4"
    assert "4" not in stopped.content[0].text


def test_a_tool_round_trip(client):
    first = client.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input["city"], str)
    second = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 C."}
                ],
            },
        ],
        tools=[WEATHER],
        extra_body=GREEDY,
    )
    assert second.content and second.content[0].type == "text" and second.content[0].text

    # The prompt grew by the call and its result (cached prefix tokens count apart).
    def prompt(usage) -> int:
        return usage.input_tokens + usage.cache_read_input_tokens

    assert prompt(second.usage) > prompt(first.usage)


def test_a_streamed_tool_call_carries_its_input_as_json_deltas(client):
    with client.messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    [use] = [block for block in final.content if block.type == "tool_use"]
    assert partial and isinstance(use.input["city"], str)
    assert final.stop_reason == "tool_use"


def test_count_tokens_matches_a_real_request(client):
    counted = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    message = client.messages.create(model=MODEL, max_tokens=5, messages=QUESTION)
    assert counted.input_tokens == message.usage.input_tokens + (
        message.usage.cache_read_input_tokens or 0
    )


def test_errors_are_anthropics_shape_and_raise_the_sdk_exceptions(client, server):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
                    ],
                }
            ],
        )
    assert "only text" in caught.value.message
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-sonnet-4", max_tokens=5, messages=QUESTION)
    assert "--model-alias" in caught.value.message
    raw = httpx.post(
        server.url + "/v1/messages?beta=true",
        json={"model": MODEL, "messages": QUESTION},
        headers={"anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_an_aliased_model_name_is_served_and_named_in_the_answer(launch):
    server = launch("--parallel", "1", "--model-alias", "claude-*")
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    message = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=20,
        messages=QUESTION,
        extra_body=GREEDY,
    )
    _check_text_message(message, model="claude-sonnet-4-5")


def test_pings_while_the_prompt_is_read_and_opt_in_progress_after_message_start(server):
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "Summarize: " + "the sky is blue. " * 40}],
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/messages",
        json=body,
        headers={"X-SwiftLM-Prefill-Progress": "true"},
        timeout=120,
    ) as response:
        names = [
            line.removeprefix("event: ")
            for line in response.iter_lines()
            if line.startswith("event:")
        ]
    assert names[0] == "message_start"
    assert "prefill_progress" in names
    first_block = names.index("content_block_start")
    assert all(name != "prefill_progress" for name in names[first_block:])
    assert names[-1] == "message_stop"


async def test_a_disconnect_mid_answer_frees_the_slot(server):
    request_id = new_request_id("messages")
    body = {
        "model": MODEL,
        "max_tokens": 300,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }
    with trio.fail_after(120):
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream(
                "POST", server.url + "/v1/messages", json=body, headers={"X-Request-Id": request_id}
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith('data: {"type":"content_block_delta"'):
                        break
        await wait_slots_free(server)
    phase, tokens = await logged_abort(server, request_id)
    assert phase == "decode" and 0 < tokens < 300
