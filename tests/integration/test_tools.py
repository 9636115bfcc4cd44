"""Tool calls from the real embedded model, read through the official openai SDK.

Deterministic on purpose: greedy decoding, and either a grammar that forces the call
(``tool_choice`` required or named) or a two-shot prompt the model follows (``auto``).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a city",
            "parameters": WEATHER,
        },
    },
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _call(city: str, i: int) -> dict:
    arguments = json.dumps({"city": city})
    function = {"name": "get_weather", "arguments": arguments}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": f"call_{i}", "type": "function", "function": function}],
    }


# The model copies the pattern of the earlier turns: its own calls, rendered as <tool_call>.
TWO_SHOT = [
    {"role": "user", "content": "Weather in London?"},
    _call("London", 1),
    {"role": "user", "content": "Weather in Rome?"},
    _call("Rome", 2),
    {"role": "user", "content": "Weather in Paris?"},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
BASE = {"model": "m", "tools": TOOLS, "temperature": 0, "max_tokens": 48}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def _check_call(name: str, arguments: str) -> dict:
    assert name == "get_weather"
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER)
    return args


def _streamed_calls(client, **kwargs) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) from a stream, checking OpenAI's delta rules."""
    content, calls, finish, arg_deltas = "", [], None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.index == len(calls):  # the first delta of a call names it
                assert tc.id and tc.type == "function" and tc.function.name
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
            else:
                assert tc.index == len(calls) - 1 and tc.id is None and tc.function.name is None
            if tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
                arg_deltas += 1
        finish = choice.finish_reason or finish
    assert arg_deltas > 1, "arguments should arrive in increments"
    return content, calls, finish


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_forced_tool_call_not_streamed(client, tool_choice):
    r = client.chat.completions.create(messages=QUESTION, tool_choice=tool_choice, **BASE)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _check_call(call.function.name, call.function.arguments)


def test_forced_tool_call_streamed(client):
    content, calls, finish = _streamed_calls(client, messages=QUESTION, tool_choice=NAMED, **BASE)
    assert content == "" and finish == "tool_calls"
    (call,) = calls
    _check_call(call["name"], call["arguments"])


def test_auto_tool_call_from_a_two_shot_prompt(client):
    r = client.chat.completions.create(messages=TWO_SHOT, **BASE)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert _check_call(call.function.name, call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content

    content, calls, finish = _streamed_calls(client, messages=TWO_SHOT, **BASE)
    assert "<tool_call>" not in content and "{" not in content
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(
        messages=QUESTION, tool_choice="none", **{**BASE, "max_tokens": 8}
    )
    choice = r.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in {"stop", "length"}


@pytest.mark.parametrize(
    "body",
    [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
        {"tool_choice": "required"},
        {"tool_choice": "always", "tools": TOOLS},
    ],
)
def test_bad_tool_choice_is_400(server, body):
    r = httpx.post(server.v1 + "/chat/completions", json={"messages": QUESTION, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tool_choice"
