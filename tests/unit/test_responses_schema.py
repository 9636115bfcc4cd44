"""The Responses API request: validation at the edge (400s naming the field) and its mapping
into the neutral request (messages, tools, tool choice, text format, history)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trioserve.api.dialects.responses import (
    MappedRequest,
    ResponsesRequest,
    ToolName,
    flat_tool_name,
    parse_responses_request,
    to_neutral,
)
from trioserve.api.dialects.responses.schema import (
    DROPPED_ITEM_TYPES,
    DroppedItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
)
from trioserve.api.errors import BadRequest
from trioserve.api.schemas import MAX_SEED, MAX_STOP_CHARS

CODEX_FIXTURES = Path(__file__).parent.parent / "fixtures" / "codex"

FN = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
CHAT_FN = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
NAMESPACE = {
    "type": "namespace",
    "name": "mcp__docs__",
    "description": "Tools in the mcp__docs__ namespace.",
    "tools": [
        {"type": "function", "name": "search", "parameters": {"type": "object"}},
        {"type": "function", "name": "fetch", "description": "Fetch a page."},
        {"type": "custom", "name": "grep", "description": "freeform"},
    ],
}


def parse(**body: Any) -> ResponsesRequest:
    body.setdefault("input", "hi")
    return parse_responses_request(json.dumps(body).encode())


def mapped(history: list[dict[str, Any]] | None = None, **body: Any) -> MappedRequest:
    return to_neutral(parse(**body), history)


def messages(**body: Any) -> list[dict[str, Any]]:
    return list(mapped(**body).neutral.messages or ())


def bad(**body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        mapped(**body)
    return err.value


# -- parsing --------------------------------------------------------------------------------


def test_a_string_input_is_one_user_message_and_defaults_follow_openai():
    req = parse(input="Hello")
    assert [(type(i), i.role, i.content) for i in req.input] == [(MessageItem, "user", "Hello")]
    assert req.store is True and req.stream is False and req.background is None
    assert req.stop_strings() == () and not req.want_logprobs


GOOD = [
    {"model": "m", "instructions": "be brief", "unknown_field": {"x": 1}},
    {"tools": [FN, CHAT_FN, NAMESPACE, {"type": "web_search"}, {"type": "mcp", "x": 1}]},
    {"tools": [{"type": "computer_use_preview"}, {"type": "local_shell"}, {"type": "custom"}]},
    {"tool_choice": "auto"},
    {"tool_choice": "none"},
    {"tool_choice": {"type": "web_search_preview"}},  # a shape OpenAI accepts (mapping refuses)
    {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
    {"parallel_tool_calls": False},
    {"text": {"format": {"type": "text"}, "verbosity": "low"}},
    {"text": {"format": {"type": "json_object"}}},
    {"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": True}}},
    {"text": {"verbosity": None}},
    {"max_output_tokens": 1, "temperature": 0, "top_p": 1},
    {"temperature": 2.0, "top_p": 0.01},
    {"stop": "x"},
    {"stop": ["a", "b", "c", "d"]},
    {"stop": ["x" * MAX_STOP_CHARS]},
    {"seed": 0},
    {"seed": MAX_SEED},
    {"top_logprobs": 0},
    {"top_logprobs": 20},
    {"reasoning": {"effort": "high", "summary": "auto"}},
    {"reasoning": {"effort": "xhigh", "generate_summary": "concise"}},
    {"reasoning": None},
    {"include": ["reasoning.encrypted_content", "message.output_text.logprobs", "future.x"]},
    {"metadata": {"k": "v" * 512}},
    {"user": "u", "prompt_cache_key": "k", "safety_identifier": "s", "service_tier": "auto"},
    {"truncation": "auto"},
    {"truncation": "disabled"},
    {"store": False},
    {"store": None},
    {"previous_response_id": "resp_1"},
    {"stream": True, "stream_options": {"include_obfuscation": False}},
    {"background": False},
    {"background": None},
    {"conversation": None, "prompt": None},
    {"max_tool_calls": 3, "context_management": [{"type": "compaction"}]},
]


@pytest.mark.parametrize("body", GOOD)
def test_good_bodies_parse(body):
    parse(**body)


BAD = [
    ({"input": 5}, "input"),
    ({"input": {"role": "user", "content": "x"}}, "input"),
    ({"input": [5]}, "input.0"),
    ({"input": ["hi"]}, "input.0"),
    ({"input": [{}]}, "input.0"),
    ({"input": [{"type": "bogus"}]}, "input.0"),
    ({"input": [{"type": "message", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user"}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": 4}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "wav"}]}]}, "input.0.content"),
    ({"input": [{"role": "user", "content": [{"type": "refusal"}]}]}, "input.0.content"),
    (
        {"input": ["x", {"type": "function_call", "name": "f", "arguments": "{}"}]},
        "input.0",  # the first problem is named first
    ),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}]},
        "input.0.name",
    ),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input.0.output"),
    (
        {"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
        "input.0.output",
    ),
    ({"input": [{"type": "custom_tool_call", "call_id": "c", "name": "f"}]}, "input.0.input"),
    ({"input": [{"type": "custom_tool_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": ["web_search"]}, "tools.0"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": 3}, "tool_choice"),
    ({"tool_choice": {"name": "f"}}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": ""}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "none", "tools": []}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": "x"}}, "tool_choice"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "schema": 3}}}, "text.format.schema"),
    ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"include": "reasoning.encrypted_content"}, "include"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"truncation": "middle"}, "truncation"),
    ({"store": "maybe"}, "store"),
    ({"previous_response_id": ""}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
]


@pytest.mark.parametrize("body, param", BAD)
def test_bad_bodies_are_400_naming_the_field(body, param):
    with pytest.raises(BadRequest) as err:
        parse(**body)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kind", ["input_image", "input_file", "input_audio"])
def test_non_text_content_is_refused_with_a_clear_message(kind):
    content = [{"type": "input_text", "text": "look"}, {"type": kind, "image_url": "x"}]
    with pytest.raises(BadRequest) as err:
        parse(input=[{"role": "user", "content": content}])
    assert err.value.param == "input.0.content"
    assert f"part 1 has type {kind!r}: only text input is supported" in err.value.message


def test_non_text_tool_output_is_refused_too():
    output = [{"type": "input_image", "image_url": "data:"}]
    with pytest.raises(BadRequest) as err:
        parse(input=[{"type": "function_call_output", "call_id": "c", "output": output}])
    assert err.value.param == "input.0.output"
    assert "only text input is supported" in err.value.message


def test_an_unknown_item_type_names_the_item_and_the_supported_types():
    with pytest.raises(BadRequest) as err:
        parse(input=[{"role": "user", "content": "x"}, {"type": "telepathy"}])
    assert err.value.param == "input.1"
    assert "'telepathy' is not supported" in err.value.message
    assert "function_call_output" in err.value.message


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input": 5}, "must be a string or a list of input items"),
        ({"background": True}, "background responses are not supported"),
        ({"conversation": "c"}, "use previous_response_id"),
    ],
)
def test_messages_say_what_to_do(body, message):
    with pytest.raises(BadRequest) as err:
        parse(**body)
    assert message in err.value.message


def test_body_level_errors_are_those_of_every_dialect():
    for raw, message in [
        (b"", "Request body is empty"),
        (b"{", "Invalid JSON body"),
        (b"[]", "must be a JSON object, not an array"),
        (b'{"input": NaN}', "NaN is not valid JSON"),
    ]:
        with pytest.raises(BadRequest) as err:
            parse_responses_request(raw)
        assert message in err.value.message


def test_items_of_every_kind_parse_to_their_model():
    req = parse(
        input=[
            {"role": "developer", "content": "rules"},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "a", "annotations": []}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": {"a": 1}},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"id": "msg_0"},  # an item_reference may leave out its type
            {"type": "web_search_call", "id": "ws_1", "action": {"type": "search"}},
        ]
    )
    kinds = [type(i) for i in req.input]
    assert kinds == [
        MessageItem,
        MessageItem,
        ReasoningItem,
        FunctionCallItem,
        FunctionCallOutputItem,
        DroppedItem,
        DroppedItem,
    ]
    assert req.input[3].arguments == '{"a": 1}'  # an object is taken as its JSON text


@pytest.mark.parametrize("kind", sorted(DROPPED_ITEM_TYPES))
def test_every_known_item_of_a_tool_this_server_does_not_run_is_accepted(kind):
    # Fields are not checked: these are what hosted tools did, replayed by the client.
    req = parse(input=[{"type": kind, "action": 5, "output": {"x": []}}])
    assert isinstance(req.input[0], DroppedItem) and req.input[0].type == kind


def test_reasoning_items_are_never_an_error_whatever_they_hold():
    for item in [
        {"type": "reasoning"},
        {"type": "reasoning", "summary": "not a list", "content": 5, "encrypted_content": None},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]},
    ]:
        assert isinstance(parse(input=[item]).input[0], ReasoningItem)


def test_logprobs_are_asked_for_through_include():
    assert parse(include=["message.output_text.logprobs"]).want_logprobs
    assert not parse(include=["reasoning.encrypted_content"]).want_logprobs


# -- mapping: messages ----------------------------------------------------------------------


def test_instructions_lead_and_developer_becomes_system():
    got = messages(
        instructions="You are terse.",
        input=[
            {"role": "developer", "content": "Sandbox: read-only."},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
        ],
    )
    assert got == [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Sandbox: read-only."},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]


def test_empty_instructions_add_nothing():
    assert messages(instructions="", input="hi") == [{"role": "user", "content": "hi"}]


def test_text_parts_are_joined_with_newlines():
    content = [
        {"type": "input_text", "text": "one"},
        {"type": "output_text", "text": "two"},
        {"type": "refusal", "refusal": "three"},
    ]
    assert messages(input=[{"role": "user", "content": content}]) == [
        {"role": "user", "content": "one\ntwo\nthree"}
    ]
    assert messages(input=[{"role": "user", "content": []}]) == [{"role": "user", "content": ""}]


def call(call_id: str, name: str = "f", arguments: str = "{}", **extra: Any) -> dict[str, Any]:
    item = {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}
    return {**item, **extra}


def tool_call(call_id: str, name: str = "f", arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_consecutive_calls_are_one_assistant_message_and_outputs_are_tool_messages():
    got = messages(
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            call("c1", "get_weather", '{"city": "Paris"}'),
            {"type": "reasoning", "summary": []},  # dropped: the calls stay together
            call("c2", "get_weather", '{"city": "Rome"}'),
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [
                    {"type": "input_text", "text": "rain"},
                    {"type": "input_text", "text": "9C"},
                ],
            },
        ]
    )
    assert got == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                tool_call("c1", "get_weather", '{"city": "Paris"}'),
                tool_call("c2", "get_weather", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain\n9C"},
    ]


def test_calls_join_the_assistant_text_right_before_them():
    got = messages(
        input=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
            call("c1"),
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
            call("c2"),  # after an output: a new assistant message
            {"role": "user", "content": "and?"},
            call("c3"),  # after a user message too
        ]
    )
    assert got == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [tool_call("c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "assistant", "content": "", "tool_calls": [tool_call("c2")]},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "", "tool_calls": [tool_call("c3")]},
    ]


def test_an_assistant_message_after_calls_is_its_own_message():
    got = messages(input=[call("c1"), {"role": "assistant", "content": "Done."}])
    assert got == [
        {"role": "assistant", "content": "", "tool_calls": [tool_call("c1")]},
        {"role": "assistant", "content": "Done."},
    ]


def test_a_namespaced_call_is_replayed_under_its_flat_name():
    got = messages(input=[call("c1", "search", '{"q": "x"}', namespace="mcp__docs__")])
    assert got[0]["tool_calls"] == [tool_call("c1", "mcp__docs__search", '{"q": "x"}')]


def test_custom_tool_calls_round_trip_like_function_calls():
    got = messages(
        input=[
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** x"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Success."},
        ]
    )
    assert got == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [tool_call("c1", "apply_patch", "*** x")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Success."},
    ]


def test_an_output_without_call_id_is_a_tool_message_without_one():
    got = messages(input=[call("c1"), {"type": "function_call_output", "output": "x"}])
    assert got[1] == {"role": "tool", "content": "x"}


def test_reasoning_and_dropped_items_leave_nothing():
    got = messages(
        input=[
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hmm"}]},
            {"type": "item_reference", "id": "msg_0"},
            {"type": "web_search_call", "id": "ws", "status": "completed"},
            {"role": "user", "content": "hi"},
        ]
    )
    assert got == [{"role": "user", "content": "hi"}]


def test_no_message_at_all_is_a_400_on_input():
    for body in [{"input": []}, {"input": [{"type": "reasoning"}]}, {"instructions": "x"}]:
        body.setdefault("input", [])
        err = bad(**body)
        assert err.param == "input" and "at least one message" in err.message


def test_history_goes_between_the_instructions_and_the_new_input():
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [tool_call("c1", "get_weather")]},
    ]
    before = [dict(m) for m in history]
    m = mapped(
        history,
        instructions="Be terse.",
        input=[{"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
        previous_response_id="resp_1",
    )
    tool_message = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert list(m.neutral.messages) == [
        {"role": "system", "content": "Be terse."},
        *history,
        tool_message,
    ]
    # What the store keeps: the conversation without this request's instructions.
    assert list(m.conversation) == [*history, tool_message]
    assert history == before  # history is not changed


def test_history_alone_is_enough():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert list(mapped(history, input=[]).neutral.messages) == history


# -- mapping: everything else ---------------------------------------------------------------


def test_sampling_and_limits_map_to_the_neutral_request():
    n = mapped(
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop=["END"],
        stream=True,
        include=["message.output_text.logprobs"],
        top_logprobs=3,
    ).neutral
    assert (n.max_tokens, n.temperature, n.top_p, n.seed, n.stop) == (64, 0.2, 0.9, 7, ("END",))
    assert n.stream and not n.include_usage and n.prompt_param == "input"
    assert n.logprobs and n.top_logprobs == 3 and n.is_chat


def test_defaults_leave_the_server_defaults():
    n = mapped().neutral
    assert (n.max_tokens, n.temperature, n.top_p, n.seed, n.stop) == (None, None, None, None, ())
    assert not n.stream and not n.logprobs and n.top_logprobs == 0
    assert (n.tools, n.tool_choice, n.response_format) == (None, None, None)


def test_top_logprobs_without_the_include_asks_for_nothing():
    n = mapped(top_logprobs=5).neutral
    assert not n.logprobs and n.top_logprobs == 0


def test_function_tools_become_chat_tools():
    m = mapped(tools=[FN, CHAT_FN])
    assert m.neutral.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": FN["parameters"],
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ]
    assert m.tool_names == {
        "get_weather": ToolName("get_weather"),
        "get_time": ToolName("get_time"),
    }


def test_a_function_without_parameters_gets_an_empty_object_schema():
    tool = {"type": "function", "name": "now", "parameters": None, "strict": None}
    fn = mapped(tools=[tool]).neutral.tools[0]["function"]
    assert fn == {"name": "now", "parameters": {"type": "object", "properties": {}}}


def test_namespace_functions_are_offered_under_flat_names_and_mapped_back():
    m = mapped(tools=[NAMESPACE, FN])
    names = [t["function"]["name"] for t in m.neutral.tools]
    assert names == ["mcp__docs__search", "mcp__docs__fetch", "get_weather"]  # custom: not offered
    assert m.neutral.tools[1]["function"]["description"] == "Fetch a page."
    assert m.tool_name("mcp__docs__search") == ToolName("search", "mcp__docs__")
    assert m.tool_name("get_weather") == ToolName("get_weather")
    assert m.tool_name("never_offered") == ToolName("never_offered")
    assert all(m.tool_names[flat].flat == flat for flat in names)


@pytest.mark.parametrize(
    "namespace, name, flat",
    [
        ("mcp__docs__", "search", "mcp__docs__search"),
        ("docs", "search", "docs__search"),
        ("docs_", "_search", "docs__search"),
        (None, "search", "search"),
        ("", "search", "search"),
    ],
)
def test_flat_names_follow_codex(namespace, name, flat):
    assert flat_tool_name(namespace, name) == flat
    assert ToolName(name, namespace or None).flat == flat


def test_deferred_functions_are_not_offered():
    deferred = {**FN, "name": "later", "defer_loading": True}
    ns = {**NAMESPACE, "tools": [{"type": "function", "name": "x", "defer_loading": True}]}
    m = mapped(tools=[deferred, ns, FN])
    assert [t["function"]["name"] for t in m.neutral.tools] == ["get_weather"]


HOSTED = [
    {"type": "web_search"},
    {"type": "web_search_preview", "search_context_size": "low"},
    {"type": "file_search", "vector_store_ids": ["vs"]},
    {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
    {"type": "mcp", "server_label": "x", "server_url": "http://x"},
    {"type": "code_interpreter", "container": "auto"},
    {"type": "image_generation"},
    {"type": "local_shell"},
    {"type": "shell"},
    {"type": "apply_patch"},
    {"type": "tool_search"},
    {"type": "custom", "name": "freeform", "format": {"type": "text"}},
    {"type": "a_type_from_the_future", "anything": [1, 2]},
]


def test_every_other_tool_type_is_ignored_never_an_error():
    m = mapped(tools=[*HOSTED, FN])
    assert [t["function"]["name"] for t in m.neutral.tools] == ["get_weather"]
    only_hosted = mapped(tools=HOSTED)
    assert only_hosted.neutral.tools is None and only_hosted.tool_names == {}


@pytest.mark.parametrize(
    "tools, param",
    [
        ([{"name": "f"}], "tools.0.type"),
        ([FN, {"type": "function"}], "tools.1.name"),
        ([{"type": "function", "name": ""}], "tools.0.name"),
        ([{"type": "function", "name": "f", "parameters": []}], "tools.0.parameters"),
        ([{"type": "function", "function": {"parameters": {}}}], "tools.0.function.name"),
        ([{"type": "namespace", "tools": []}], "tools.0.name"),
        ([{"type": "namespace", "name": "ns"}], "tools.0.tools"),
        (
            [{"type": "namespace", "name": "ns", "tools": [{"type": "function"}]}],
            "tools.0.tools.0.name",
        ),
        ([FN, FN], "tools.1.name"),
        ([{**FN, "name": "docs__search"}, {**NAMESPACE, "name": "docs"}], "tools.1.tools.0.name"),
    ],
)
def test_malformed_function_tools_are_400_naming_the_field(tools, param):
    assert bad(tools=tools).param == param


def test_tool_choice_strings_pass_through():
    for choice in ["auto", "none", "required"]:
        assert mapped(tools=[FN], tool_choice=choice).neutral.tool_choice == choice


def test_a_named_function_becomes_chats_shape():
    n = mapped(tools=[FN], tool_choice={"type": "function", "name": "get_weather"}).neutral
    assert n.tool_choice == {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "function", "name": "mcp__docs__search"},
        {"type": "function", "name": "search", "namespace": "mcp__docs__"},
        {"type": "function", "name": "search"},  # the only function of that name
    ],
)
def test_a_named_namespaced_function_is_found(choice):
    n = mapped(tools=[NAMESPACE, FN], tool_choice=choice).neutral
    assert n.tool_choice == {"type": "function", "function": {"name": "mcp__docs__search"}}


@pytest.mark.parametrize(
    "tools, choice",
    [
        ([FN], {"type": "function", "name": "nope"}),
        ([{"type": "web_search"}], {"type": "function", "name": "web_search"}),
        ([{**FN, "defer_loading": True}], {"type": "function", "name": "get_weather"}),
        ([NAMESPACE, {**NAMESPACE, "name": "other"}], {"type": "function", "name": "search"}),
        ([FN], {"type": "web_search_preview"}),
        ([FN], {"type": "file_search"}),
        ([FN], {"type": "mcp", "server_label": "x"}),
        ([FN], {"type": "custom", "name": "freeform"}),
        ([FN], {"type": "apply_patch"}),
        ([FN], {"type": "shell"}),
    ],
)
def test_a_choice_this_server_cannot_honour_is_a_400_on_tool_choice(tools, choice):
    err = bad(tools=tools, tool_choice=choice)
    assert err.param == "tool_choice"


def test_allowed_tools_narrow_what_is_offered():
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [
            {"type": "function", "name": "get_weather"},
            {"type": "web_search"},  # allows nothing here
            {"type": "function", "name": "not_offered"},
        ],
    }
    n = mapped(tools=[FN, CHAT_FN, NAMESPACE], tool_choice=choice).neutral
    assert n.tool_choice == "required"
    assert [t["function"]["name"] for t in n.tools] == ["get_weather"]
    by_namespace = {
        **choice,
        "mode": "auto",
        "tools": [{"type": "namespace", "name": "mcp__docs__"}],
    }
    n = mapped(tools=[FN, NAMESPACE], tool_choice=by_namespace).neutral
    assert n.tool_choice == "auto"
    assert [t["function"]["name"] for t in n.tools] == ["mcp__docs__search", "mcp__docs__fetch"]


@pytest.mark.parametrize(
    "fmt, response_format",
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True},
            {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
            },
        ),
        (
            {"type": "json_schema", "schema": {}, "description": "d"},
            {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": {}, "description": "d"},
            },
        ),
    ],
)
def test_text_format_becomes_response_format(fmt, response_format):
    text = {"verbosity": "low"} if fmt is None else {"format": fmt}
    assert mapped(text=text).neutral.response_format == response_format


# -- Codex ----------------------------------------------------------------------------------

# Built by hand from what Codex 0.169 was measured to send (docs in /work/shared/FACTS.md and
# Codex's sources): base instructions, a developer message, nine tools among them a
# `namespace` and `web_search`, `store: false`, encrypted reasoning asked for and replayed.
CODEX_TOOLS = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Runs a command in a PTY.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string"}, "workdir": {"type": "string"}},
            "required": ["cmd"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "write_stdin",
        "description": "Writes characters to an exec session.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"session_id": {"type": "number"}, "chars": {"type": "string"}},
            "required": ["session_id"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "update_plan",
        "description": "Updates the task plan.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"plan": {"type": "array", "items": {"type": "object"}}},
            "required": ["plan"],
            "additionalProperties": False,
        },
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files.",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"},
    },
    {
        "type": "function",
        "name": "view_image",
        "description": "Attach a local image.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
            "additionalProperties": False,
        },
    },
    {"type": "web_search", "external_web_access": False},
    {
        "type": "namespace",
        "name": "mcp__docs__",
        "description": "Tools in the mcp__docs__ namespace.",
        "tools": [
            {
                "type": "function",
                "name": "search",
                "description": "Search the docs.",
                "strict": False,
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
            {
                "type": "function",
                "name": "fetch_page",
                "description": "Fetch one page.",
                "strict": False,
                "defer_loading": True,
                "parameters": {"type": "object", "properties": {"url": {"type": "string"}}},
            },
        ],
    },
    {
        "type": "function",
        "name": "list_mcp_resources",
        "description": "Lists resources provided by MCP servers.",
        "strict": False,
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
    {"type": "local_shell"},
]


def codex_first_request() -> dict[str, Any]:
    return {
        "model": "trioserve",
        "instructions": "You are Codex, a coding agent based on GPT-5. " * 20,
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [
                    {"type": "input_text", "text": "<permissions instructions>\nread-only"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "# AGENTS.md instructions\n..."},
                    {
                        "type": "input_text",
                        "text": "<environment_context>\n<cwd>/tmp/x</cwd>\n</environment_context>",
                    },
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hello."}],
            },
        ],
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a3e2-5f4c-7a10-9d3e-2b6f1c8e4a77",
        "text": {"verbosity": "medium"},
        "client_metadata": {"x-codex-installation-id": "abc"},
    }


def codex_second_request() -> dict[str, Any]:
    body = codex_first_request()
    body["input"] += [
        {
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "**Running ls**"}],
            "content": None,
            "encrypted_content": "gAAAAABo-opaque-blob",
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Listing files."}],
        },
        {
            "type": "function_call",
            "name": "exec_command",
            "arguments": '{"cmd":"ls"}',
            "call_id": "call_1",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt\nb.txt"},
        {
            "type": "function_call",
            "name": "search",
            "namespace": "mcp__docs__",
            "arguments": '{"q":"x"}',
            "call_id": "call_2",
        },
        {"type": "function_call_output", "call_id": "call_2", "output": "no results"},
    ]
    return body


def _request_body(data: Any) -> dict[str, Any]:
    """The request body in a captured fixture: the body itself, or under ``body`` /
    ``request`` (a JSON text or an object)."""
    if isinstance(data, dict) and "input" in data:
        return data
    for key in ("body", "request", "json"):
        inner = data.get(key) if isinstance(data, dict) else None
        if isinstance(inner, str):
            inner = json.loads(inner)
        if isinstance(inner, dict):
            return _request_body(inner)
    raise AssertionError("no Responses request body (with 'input') found in the fixture")


def _codex_cases() -> list[Any]:
    cases = [
        pytest.param(codex_first_request(), id="hand-built-first-turn"),
        pytest.param(codex_second_request(), id="hand-built-tool-round-trip"),
    ]
    for path in sorted(CODEX_FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, list):  # several captured requests in one file
            cases += [pytest.param(d, id=f"{path.name}[{i}]") for i, d in enumerate(data)]
        else:
            cases.append(pytest.param(data, id=path.name))
    return cases


@pytest.mark.parametrize("captured", _codex_cases())
def test_a_codex_request_parses_and_maps(captured):
    body = _request_body(captured)
    req = parse_responses_request(json.dumps(body).encode())
    m = to_neutral(req)
    n = m.neutral
    roles = [msg["role"] for msg in n.messages]
    assert roles[0] == "system" and "user" in roles
    if body.get("instructions"):
        assert n.messages[0]["content"] == body["instructions"]
    # Every function Codex offers (its namespaces' too) is offered; other types are not.
    expected: list[str] = []
    for tool in body.get("tools") or []:
        if tool.get("type") == "function" and not tool.get("defer_loading"):
            expected.append(tool["name"])
        elif tool.get("type") == "namespace":
            expected += [
                flat_tool_name(tool["name"], t["name"])
                for t in tool["tools"]
                if t.get("type") == "function" and not t.get("defer_loading")
            ]
    assert [t["function"]["name"] for t in n.tools or []] == expected
    assert all(m.tool_name(flat).flat == flat for flat in expected)
    assert req.store is (body.get("store") is not False)
    assert n.prompt_param == "input"
    if not (body.get("text") or {}).get("format"):
        assert n.response_format is None


def test_the_hand_built_codex_requests_map_as_expected():
    first = to_neutral(parse_responses_request(json.dumps(codex_first_request()).encode()))
    assert [t["function"]["name"] for t in first.neutral.tools] == [
        "exec_command",
        "write_stdin",
        "update_plan",
        "view_image",
        "mcp__docs__search",  # fetch_page is deferred; apply_patch is custom
        "list_mcp_resources",
    ]
    assert [m["role"] for m in first.neutral.messages] == ["system", "system", "user", "user"]
    assert first.neutral.messages[1]["content"] == "<permissions instructions>\nread-only"
    assert first.neutral.messages[2]["content"].endswith("</environment_context>")
    assert first.neutral.tool_choice == "auto" and first.neutral.stream

    second = to_neutral(parse_responses_request(json.dumps(codex_second_request()).encode()))
    assert list(second.neutral.messages[4:]) == [
        {
            "role": "assistant",
            "content": "Listing files.",
            "tool_calls": [tool_call("call_1", "exec_command", '{"cmd":"ls"}')],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [tool_call("call_2", "mcp__docs__search", '{"q":"x"}')],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "no results"},
    ]
    assert second.tool_name("mcp__docs__search") == ToolName("search", "mcp__docs__")


def test_the_mapped_codex_round_trip_renders_with_the_real_template(model_dir):
    # The shared pipeline's first steps, on the embedded model's tokenizer: the plan and the
    # chat template take the mapped messages and tools as they take Chat's.
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from trioserve.api.tooling import plan_chat
    from trioserve.models.chat_template import chat_prompt_tokens

    tokenizer = load_tokenizer(model_dir)
    n = to_neutral(parse_responses_request(json.dumps(codex_second_request()).encode())).neutral
    plan = plan_chat(n, tokenizer, None)
    assert [t["function"]["name"] for t in plan.tools] == [t["function"]["name"] for t in n.tools]
    text = tokenizer.decode(chat_prompt_tokens(tokenizer, n.template_messages(), plan.tools))
    for needle in ["read-only", "Say hello.", "Listing files.", "a.txt", "mcp__docs__search"]:
        assert needle in text
