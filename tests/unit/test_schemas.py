"""Request validation at the edge, and conversion to engine parameters."""

import json

import pytest

from trioserve.api.dialects.chat import chat_to_neutral, completion_to_neutral
from trioserve.api.errors import BadRequest
from trioserve.api.schemas import (
    MAX_SEED,
    MAX_STOP_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
)
from trioserve.engine.params import GenerationRequest, SamplingParams

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return parse_chat_request(json.dumps({"messages": MSG, **fields}).encode())


GOOD_CHAT = [
    {"messages": MSG, "n": 1},
    {"messages": MSG, "stop": "x"},
    {"messages": MSG, "stop": ["a", "b", "c", "d"]},
    {"messages": MSG, "stop": ["x" * MAX_STOP_CHARS]},
    {"messages": MSG, "unknown_field": {"x": 1}},
    # Neutral values of fields we do not implement: SDKs send them as defaults.
    {"messages": MSG, "logit_bias": {}},
    {"messages": MSG, "logit_bias": None},
    {"messages": MSG, "seed": 0},
    {"messages": MSG, "seed": MAX_SEED},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
    {"messages": [{"role": "developer", "content": "be brief"}, *MSG]},
    {
        "messages": MSG,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
    },
    {"messages": MSG, "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"messages": MSG, "response_format": {"type": "json_object"}},
    {"messages": MSG, "temperature": 0, "top_p": 1, "presence_penalty": -2, "seed": 3},
    {"messages": MSG, "stream": True, "stream_options": {"include_usage": True}},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
]


@pytest.mark.parametrize("body", GOOD_CHAT)
def test_good_chat(body):
    assert isinstance(parse_chat_request(json.dumps(body).encode()), ChatCompletionRequest)


BAD_CHAT = [
    ({"messages": MSG, "n": 2}, "n", "only n=1 is supported"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role", "messages.0.role"),
    ({}, "messages", "messages: Field required"),
    ({"messages": []}, "messages", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
        "only text content is supported",
    ),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "messages.0.content"),
    ({"messages": MSG, "temperature": 3}, "temperature", "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p", "top_p"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": MSG, "stop": [""]}, "stop", "must not be empty"),
    ({"messages": MSG, "stop": 5}, "stop", "stop"),
    ({"messages": MSG, "stop": "x" * (MAX_STOP_CHARS + 1)}, "stop", "at most 256 characters"),
    ({"messages": MSG, "stop": ["a", "y" * 10_000]}, "stop", "at most 256 characters"),
    ({"messages": MSG, "seed": -1}, "seed", "greater than or equal to 0"),
    ({"messages": MSG, "seed": MAX_SEED + 1}, "seed", "less than or equal to"),
    ({"messages": MSG, "seed": 2**80}, "seed", "seed"),
    ({"messages": MSG, "logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", "max_compl"),
    ({"messages": MSG, "presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"messages": MSG, "top_logprobs": 21}, "top_logprobs", "top_logprobs"),
]


@pytest.mark.parametrize("body,param,needle", BAD_CHAT)
def test_bad_chat(body, param, needle):
    with pytest.raises(BadRequest) as info:
        parse_chat_request(json.dumps(body).encode())
    assert info.value.status == 400
    assert info.value.param == param
    assert needle in info.value.message


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b"{not json", "Invalid JSON body"),
        (b"", "empty"),
        (b'{"messages": NaN}', "Invalid JSON body"),
        (b"\xff\xfe\xfa", "Invalid JSON body"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"hi"', "must be a JSON object"),
    ],
)
def test_bad_body(raw, needle):
    with pytest.raises(BadRequest) as info:
        parse_chat_request(raw)
    assert info.value.status == 400 and needle in info.value.message


def test_template_dicts():
    req = chat(
        messages=[
            {"role": "developer", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    )
    assert req.template_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


def _max_tokens(parsed, default_cap: int) -> int:
    return (
        chat_to_neutral(parsed).generation_request((1,), default_max_tokens=default_cap).max_tokens
    )


def test_max_tokens():
    assert _max_tokens(chat(), 512) == 512
    assert _max_tokens(chat(max_tokens=10), 512) == 10
    assert _max_tokens(chat(max_tokens=10_000), 512) == 10_000  # context checked elsewhere
    assert _max_tokens(chat(max_tokens=10, max_completion_tokens=20), 512) == 20


def test_stop_strings():
    assert chat().stop_strings() == ()
    assert chat(stop="x").stop_strings() == ("x",)
    assert chat(stop=["a", "b"]).stop_strings() == ("a", "b")


def test_sampling_defaults():
    assert chat_to_neutral(chat()).sampling_params() == SamplingParams(temperature=1.0, top_p=1.0)
    assert chat_to_neutral(chat()).sampling_params(default_temperature=0.0).temperature == 0.0
    assert (
        chat_to_neutral(chat(temperature=0)).sampling_params(default_temperature=0.7).temperature
        == 0.0
    )


def test_sampling_values():
    p = chat_to_neutral(
        chat(
            temperature=0.5,
            top_p=0.9,
            seed=7,
            presence_penalty=1,
            frequency_penalty=-1,
            logprobs=True,
            top_logprobs=3,
        )
    ).sampling_params()
    assert p == SamplingParams(0.5, 0.9, 7, 1.0, -1.0, logprobs=True, top_logprobs=3)


def test_chat_logprobs_flags():
    assert (chat().want_logprobs, chat().top_logprobs_count) == (False, 0)
    assert chat(top_logprobs=5).top_logprobs_count == 0  # needs logprobs=true
    assert (chat(logprobs=True).want_logprobs, chat(logprobs=True).top_logprobs_count) == (True, 0)


def test_include_usage():
    assert chat().include_usage is False
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage is True


def test_generation_request():
    req = chat_to_neutral(chat(max_tokens=5, stop="\n", temperature=0)).generation_request(
        (1, 2, 3), default_max_tokens=100, request_id="r1"
    )
    assert req == GenerationRequest(
        prompt_tokens=(1, 2, 3),
        max_tokens=5,
        stop=("\n",),
        sampling=SamplingParams(temperature=0.0),
        request_id="r1",
    )


def completion(**fields) -> CompletionRequest:
    return parse_completion_request(json.dumps(fields).encode())


@pytest.mark.parametrize(
    "prompt,expected",
    [("hi", "hi"), (["hi"], "hi"), ([1, 2], [1, 2]), ([[1, 2]], [1, 2]), ("", "")],
)
def test_completion_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "fields,param,needle",
    [
        ({"prompt": ["a", "b"]}, "prompt", "only one prompt is supported"),
        ({"prompt": [[1], [2]]}, "prompt", "only one prompt is supported"),
        ({"prompt": []}, "prompt", "prompt"),
        ({"prompt": [True]}, "prompt", "prompt"),
        ({"prompt": [-1]}, "prompt", "prompt"),
        ({}, "prompt", "prompt: Field required"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "logprobs"),
        ({"prompt": "x", "n": 2}, "n", "only n=1 is supported"),
        # Not implemented: a 400 that says so, never an answer that silently ignores them.
        ({"prompt": "x", "echo": True}, "echo", "echo=true is not supported"),
        ({"prompt": "x", "suffix": "}"}, "suffix", "not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "only best_of=1 is supported"),
        ({"prompt": "x", "best_of": 0}, "best_of", "only best_of=1 is supported"),
        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
        ({"prompt": "x", "seed": -5}, "seed", "seed"),
        ({"prompt": "x", "stop": "z" * 257}, "stop", "at most 256 characters"),
    ],
)
def test_bad_completion(fields, param, needle):
    with pytest.raises(BadRequest) as info:
        completion(**fields)
    assert info.value.status == 400 and needle in info.value.message
    assert info.value.param == param


def test_unsupported_field_error_is_openai_shaped():
    with pytest.raises(BadRequest) as info:
        completion(prompt="x", echo=True)
    assert info.value.body() == {
        "error": {
            "message": "Invalid request: echo: echo=true is not supported by this server",
            "type": "invalid_request_error",
            "param": "echo",
            "code": None,
        }
    }


def test_completion_logprobs_and_neutral_extras():
    req = completion(prompt="x", logprobs=0, echo=False, suffix="", best_of=1, logit_bias={})
    assert (req.want_logprobs, req.top_logprobs_count) == (True, 0)
    neutral = completion_to_neutral(completion(prompt="x", logprobs=3))
    assert neutral.sampling_params().top_logprobs == 3
    assert completion(prompt="x").want_logprobs is False
    assert completion(prompt="x", echo=None, suffix=None, best_of=None).prompt == "x"


def test_seed_range_is_what_mlx_accepts():
    # The bounds are mx.random.key's: both ends work there, one past either end does not.
    mx = pytest.importorskip("mlx.core")
    mx.random.key(0)
    mx.random.key(MAX_SEED)
    for outside in (-1, MAX_SEED + 1):
        with pytest.raises((TypeError, OverflowError, ValueError)):
            mx.random.key(outside)
    assert chat_to_neutral(chat(seed=MAX_SEED)).sampling_params().seed == MAX_SEED
