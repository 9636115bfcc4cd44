"""``/v1/responses`` with the official openai SDK (sync and async), checked field by field,
and the same cancellation guarantees as Chat Completions on this endpoint."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import trio

from tests.integration.test_disconnect import logged_abort, new_request_id, wait_slots_free

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _check_text_response(response, *, status: str = "completed") -> str:
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == MODEL and response.status == status
    assert response.created_at > 0
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    [part] = item.content
    assert part.type == "output_text" and part.text == response.output_text
    usage = response.usage
    assert usage.input_tokens > 5 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    return response.output_text


def _check_events(events) -> object:
    """The event sequence of one text answer; returns the final response."""
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = next(e for e in events if e.type == "response.output_item.added")
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and {e.item_id for e in deltas} == {added.item.id}
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert done.text == "".join(e.delta for e in deltas) == final.output_text
    assert final.output[0].id == added.item.id
    assert events[0].response.id == final.id
    return final


def test_a_whole_answer_sync(client):
    response = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0
    )
    assert "Paris" in _check_text_response(response)


async def test_a_whole_answer_async_with_instructions(async_client):
    response = await async_client.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        max_output_tokens=40,
        temperature=0,
    )
    assert "Paris" in _check_text_response(response)
    assert response.instructions == "Answer in one short sentence."


def test_a_streamed_answer_sync(client):
    stream = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0, stream=True
    )
    final = _check_events(list(stream))
    assert "Paris" in _check_text_response(final)


async def test_a_streamed_answer_async_through_the_stream_helper(async_client):
    async with async_client.responses.stream(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    _check_events(events)
    assert "Paris" in _check_text_response(final)


def test_max_output_tokens_ends_incomplete(client):
    response = client.responses.create(
        model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0
    )
    _check_text_response(response, status="incomplete")
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_a_function_call_round_trip(client):
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        store=False,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C."},
        ],
        tools=[WEATHER],
        max_output_tokens=40,
        temperature=0,
        store=False,
    )
    assert second.status in ("completed", "incomplete")
    assert second.output_text.strip()
    assert second.usage.input_tokens > first.usage.input_tokens


def test_previous_response_id_continues_and_get_and_delete_work(client):
    first = client.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=20, temperature=0
    )
    fetched = client.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text
    second = client.responses.create(
        model=MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=20,
        temperature=0,
    )
    alone = client.responses.create(
        model=MODEL, input="What is my name?", max_output_tokens=20, temperature=0, store=False
    )
    # The first turn and its answer went before the new input.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(first.id)
    assert first.id in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi.", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store=False keeps nothing


def test_text_format_json_schema_is_followed(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="Name a city and its country as JSON.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    assert response.status == "completed"
    value = json.loads(response.output_text)
    assert set(value) == {"city", "country"}
    assert response.text.format.type == "json_schema"


def test_a_bad_request_raises_the_sdk_error_with_our_message(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
        )
    assert "only text input is supported" in caught.value.message
    assert caught.value.body["param"].startswith("input")


def test_tool_types_the_server_cannot_run_are_accepted(client):
    response = client.responses.create(
        model=MODEL,
        input=QUESTION,
        tools=[
            {"type": "web_search"},
            {"type": "namespace", "name": "fs", "description": "files", "tools": [WEATHER]},
        ],
        include=["reasoning.encrypted_content"],
        reasoning={"summary": "auto"},
        store=False,
        max_output_tokens=20,
        temperature=0,
        extra_body={"prompt_cache_key": "session-1"},
    )
    assert response.status in ("completed", "incomplete")


def test_progress_events_are_opt_in_and_the_sdk_reads_past_them(client):
    plain = list(
        client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=5, stream=True)
    )
    assert not [e for e in plain if e.type == "prefill_progress"]
    events = list(
        client.responses.create(
            model=MODEL,
            input="Summarize: " + "the weather is fine today. " * 20,
            max_output_tokens=5,
            stream=True,
            extra_headers={"X-SwiftLM-Prefill-Progress": "true"},
        )
    )
    progress = [e for e in events if e.type == "prefill_progress"]
    assert progress
    first_output = next(i for i, e in enumerate(events) if e.type == "response.output_item.added")
    assert all(e.type != "prefill_progress" for e in events[first_output:])
    assert events[-1].type in ("response.completed", "response.incomplete")


async def test_a_disconnect_mid_answer_frees_the_slot(server):
    body = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 300}
    request_id = new_request_id("responses")
    headers = {"X-Request-Id": request_id}
    with trio.fail_after(120):
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream(
                "POST", server.v1 + "/responses", json={**body, "stream": True}, headers=headers
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("event: response.output_text.delta"):
                        break
        await wait_slots_free(server)
    phase, tokens = await logged_abort(server, request_id)
    assert phase == "decode" and 0 < tokens < 300
