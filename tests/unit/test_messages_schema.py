"""The Messages API request: validation at the edge (400s naming the field) and its mapping
into the neutral request (turns, tool round trips, tools, tool choice, sampling, formats)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trioserve.api.dialects.messages import (
    MappedMessages,
    MessagesRequest,
    parse_messages_request,
    to_neutral,
)
from trioserve.api.dialects.messages.mapping import strip_attribution
from trioserve.api.dialects.messages.schema import (
    DROPPED_BLOCK_TYPES,
    MAX_STOP_SEQUENCES,
    REFUSED_BLOCK_TYPES,
    ClientTool,
    CompactionBlock,
    DroppedBlock,
    RedactedThinkingBlock,
    ServerTool,
    TextBlock,
    ThinkingBlock,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from trioserve.api.errors import BadRequest
from trioserve.api.schemas import MAX_STOP_CHARS

CLAUDE_FIXTURES = Path(__file__).parent.parent / "fixtures" / "claude"

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TIME = {"type": "custom", "name": "get_time", "input_schema": {"type": "object"}}
# Server and Anthropic-defined tools, as the anthropic SDK (2.16) defines them.
SERVER_TOOLS = [
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    {"type": "web_fetch_20250910", "name": "web_fetch"},
    {"type": "bash_20250124", "name": "bash"},
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    {"type": "computer_20250124", "name": "computer", "display_width_px": 1024},
    {"type": "code_execution_20250825", "name": "code_execution"},
    {"type": "memory_20250818", "name": "memory"},
    {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
    {"type": "mcp_toolset", "mcp_server_name": "docs"},
    {"type": "a_type_from_the_future", "anything": [1, 2]},
]


def body(**fields: Any) -> dict[str, Any]:
    fields.setdefault("model", "claude-sonnet-4-5")
    fields.setdefault("max_tokens", 64)
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return fields


def parse(**fields: Any) -> MessagesRequest:
    return parse_messages_request(json.dumps(body(**fields)).encode())


def mapped(**fields: Any) -> MappedMessages:
    return to_neutral(parse(**fields))


def messages(**fields: Any) -> list[dict[str, Any]]:
    return list(mapped(**fields).neutral.messages or ())


def bad(**fields: Any) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        mapped(**fields)
    return err.value


def user(*content: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(content)}


def text(t: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": t, **extra}


def tool_use(id_: str, name: str = "get_weather", **input_: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": id_, "name": name, "input": input_}


def tool_result(id_: str, content: Any = "ok", **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": id_, "content": content, **extra}


def call(id_: str, name: str = "get_weather", arguments: str = "{}") -> dict[str, Any]:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- parsing --------------------------------------------------------------------------------


def test_a_minimal_body_and_the_defaults():
    req = parse()
    assert (req.model, req.max_tokens, req.stream) == ("claude-sonnet-4-5", 64, False)
    [message] = req.messages
    assert message.role == "user" and message.content == [TextBlock(type="text", text="hi")]
    assert req.system == [] and req.tools is None and req.tool_choice is None
    assert req.stop_sequences is None and req.thinking is None


GOOD = [
    {"system": "Be brief."},
    {"system": [text("a", cache_control={"type": "ephemeral", "ttl": "1h"}), text("b")]},
    {"system": None},
    {"messages": [user(text("a", citations=None, cache_control={"type": "ephemeral"}))]},
    {"messages": [{"role": "user", "content": []}]},
    {"messages": [{"role": "system", "content": "inline"}, {"role": "user", "content": "x"}]},
    {"tools": [WEATHER, TIME, *SERVER_TOOLS]},
    {"tools": [{**WEATHER, "strict": True, "cache_control": {"type": "ephemeral"}}]},
    {"tools": [{**WEATHER, "type": None, "input_examples": [{"city": "Paris"}]}]},
    {"tools": []},
    {"tool_choice": {"type": "auto"}},
    {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
    {"tools": [WEATHER], "tool_choice": {"type": "any", "disable_parallel_tool_use": False}},
    {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}},
    {"tool_choice": {"type": "none"}},
    {"stop_sequences": ["\n\nHuman:"]},
    {"stop_sequences": [str(i) for i in range(MAX_STOP_SEQUENCES)]},
    {"stop_sequences": ["x" * MAX_STOP_CHARS]},
    {"stop_sequences": []},
    {"temperature": 0, "top_p": 1, "top_k": 0},
    {"temperature": 1.0, "top_p": 0.01, "top_k": 500},
    {"max_tokens": 1},
    {"max_tokens": 32000},
    {"stream": True},
    {"stream": None},
    {"metadata": {"user_id": "user_abc_account__session_123", "other": 1}},
    {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    {"thinking": {"type": "enabled", "budget_tokens": 10, "display": "omitted"}},
    {"thinking": {"type": "disabled"}},
    {"thinking": {"type": "adaptive"}},
    {"thinking": {"type": "between_tools"}},
    {"output_config": {"effort": "high"}},
    {"output_config": {"effort": "max", "format": None}},
    {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
    {"service_tier": "auto", "container": "container_1", "inference_geo": "us"},
    {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
    {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]},
    {"cache_control": {"type": "ephemeral"}, "speed": "fast", "betas": ["x"]},
]


@pytest.mark.parametrize("fields", GOOD)
def test_good_bodies_parse_and_map(fields):
    to_neutral(parse(**fields))


BAD = [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages.0"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [user("hi")]}, "messages.0.content.0"),
    ({"messages": [user({})]}, "messages.0.content.0"),
    ({"messages": [user(text("a"), {"type": "bogus"})]}, "messages.0.content.1"),
    ({"messages": [user({"type": "text"})]}, "messages.0.content.0.text"),
    ({"messages": [user({"type": "text", "text": 5})]}, "messages.0.content.0.text"),
    (
        {"messages": [assistant({"type": "tool_use", "name": "f", "input": {}}), user(text("x"))]},
        "messages.0.content.0.id",
    ),
    (
        {"messages": [assistant(tool_use("t1") | {"name": ""}), user(text("x"))]},
        "messages.0.content.0.name",
    ),
    (
        {"messages": [assistant(tool_use("t1") | {"input": "{}"}), user(text("x"))]},
        "messages.0.content.0.input",
    ),
    (
        {"messages": [user({"type": "tool_result", "content": "x"})]},
        "messages.0.content.0.tool_use_id",
    ),
    ({"messages": [user(tool_result("t1", 5))]}, "messages.0.content.0.content"),
    ({"messages": [user(tool_result("t1", ["x"]))]}, "messages.0.content.0.content.0"),
    (
        {"messages": [user(tool_result("t1", [text("a"), {"type": "tool_use"}]))]},
        "messages.0.content.0.content.1",
    ),
    ({"messages": [user(tool_result("t1", is_error="maybe"))]}, "messages.0.content.0.is_error"),
    ({"messages": [user({"type": "compaction", "content": 5})]}, "messages.0.content.0.content"),
    ({"system": 5}, "system"),
    ({"system": [{"type": "text"}]}, "system.0.text"),
    ({"system": [text("a"), "b"]}, "system.1"),
    ({"system": [text("a"), {"type": "tool_use"}]}, "system.1"),
    ({"system": [{"type": "image", "source": {}}]}, "system.0"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": ["web_search"]}, "tools.0"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "f", "input_schema": "object"}]}, "tools.0.input_schema"),
    ({"tools": [{"input_schema": {}}]}, "tools.0.name"),
    ({"tools": [{"name": "", "input_schema": {}}]}, "tools.0.name"),
    ({"tools": [{"type": 5, "name": "f", "input_schema": {}}]}, "tools.0.type"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {}}, "tool_choice"),
    ({"tool_choice": {"type": "required"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "tool", "name": ""}}, "tool_choice.name"),
    (
        {"tool_choice": {"type": "any", "disable_parallel_tool_use": "maybe"}},
        "tool_choice.disable_parallel_tool_use",
    ),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [1]}, "stop_sequences"),
    ({"stop_sequences": ["a"] * (MAX_STOP_SEQUENCES + 1)}, "stop_sequences"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": ["x" * (MAX_STOP_CHARS + 1)]}, "stop_sequences"),
    ({"temperature": 1.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stream": "maybe"}, "stream"),
    ({"thinking": {"budget_tokens": 2048}}, "thinking.type"),
    ({"thinking": "adaptive"}, "thinking"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ({"metadata": "x"}, "metadata"),
    ({"mcp_servers": {"name": "x"}}, "mcp_servers"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_bad_bodies_are_400_naming_the_field(fields, param):
    with pytest.raises(BadRequest) as err:
        parse(**fields)
    assert err.value.status == 400 and err.value.param == param
    assert param in err.value.message


@pytest.mark.parametrize("kind", sorted(REFUSED_BLOCK_TYPES))
def test_non_text_blocks_are_refused_naming_the_block(kind):
    block = {"type": kind, "source": {"type": "base64", "media_type": "image/png", "data": "x"}}
    with pytest.raises(BadRequest) as err:
        parse(messages=[user(text("look"), block)])
    assert err.value.param == "messages.0.content.1"
    assert f"type {kind!r}" in err.value.message
    assert "only text content is supported" in err.value.message


def test_non_text_tool_results_are_refused_too():
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    with pytest.raises(BadRequest) as err:
        parse(messages=[user(tool_result("t1", [text("see"), image]))])
    assert err.value.param == "messages.0.content.0.content.1"
    assert "only text content is supported" in err.value.message


def test_an_unknown_block_type_names_the_block_and_the_supported_types():
    with pytest.raises(BadRequest) as err:
        parse(messages=[user(text("a"), {"type": "telepathy"})])
    assert err.value.param == "messages.0.content.1"
    assert "'telepathy' is not supported" in err.value.message
    assert "tool_result" in err.value.message


@pytest.mark.parametrize(
    "turns, param, message",
    [
        ([user(tool_use("t1"))], "messages.0.content.0", "tool_use blocks belong in assistant"),
        (
            [user(text("q")), assistant(text("a"), tool_result("t1")), user(text("x"))],
            "messages.1.content.1",
            "tool_result blocks belong in user",
        ),
        (
            [{"role": "system", "content": [tool_use("t1")]}, user(text("x"))],
            "messages.0.content.0",
            "text blocks only",
        ),
    ],
)
def test_a_block_in_the_wrong_roles_turn_is_a_400(turns, param, message):
    with pytest.raises(BadRequest) as err:
        parse(messages=turns)
    assert err.value.param == param and message in err.value.message


def test_a_last_assistant_turn_asks_for_prefill_which_is_a_400():
    with pytest.raises(BadRequest) as err:
        parse(messages=[user(text("Greek for Sun?")), assistant(text("The answer is ("))])
    assert err.value.param == "messages.1"
    assert "prefill" in err.value.message and "End with a user message" in err.value.message


def test_max_tokens_zero_says_why():
    with pytest.raises(BadRequest) as err:
        parse(max_tokens=0)
    assert "at least 1" in err.value.message and "not supported" in err.value.message


def test_body_level_errors_are_those_of_every_dialect():
    for raw, message in [
        (b"", "Request body is empty"),
        (b"{", "Invalid JSON body"),
        (b"[]", "must be a JSON object, not an array"),
        (b'{"max_tokens": NaN}', "NaN is not valid JSON"),
    ]:
        with pytest.raises(BadRequest) as err:
            parse_messages_request(raw)
        assert message in err.value.message


def test_blocks_of_every_kind_parse_to_their_model():
    req = parse(
        messages=[
            user(text("q")),
            assistant(
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                text("Looking."),
                tool_use("t1", city="Paris"),
                {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
                {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
            ),
            user(
                tool_result("t1", [text("sunny"), {"type": "tool_reference", "tool_name": "x"}]),
                {"type": "compaction", "content": "summary"},
                text("thanks"),
            ),
        ]
    )
    kinds = [type(b) for m in req.messages for b in m.content]
    assert kinds == [
        TextBlock,
        ThinkingBlock,
        RedactedThinkingBlock,
        TextBlock,
        ToolUseBlock,
        DroppedBlock,
        DroppedBlock,
        ToolResultBlock,
        CompactionBlock,
        TextBlock,
    ]
    result = req.messages[2].content[0]
    assert result.content == [
        TextBlock(type="text", text="sunny"),
        DroppedBlock(type="tool_reference"),
    ]
    assert result.is_error is False and result.text() == "sunny"


@pytest.mark.parametrize("kind", sorted(DROPPED_BLOCK_TYPES))
def test_every_block_of_a_tool_this_server_does_not_run_is_accepted(kind):
    req = parse(messages=[user({"type": kind, "content": 5, "input": "x"}, text("hi"))])
    assert req.messages[0].content[0] == DroppedBlock(type=kind)


def test_thinking_blocks_are_never_an_error_whatever_they_hold():
    for block in [
        {"type": "thinking"},
        {"type": "thinking", "thinking": 5, "signature": None},
        {"type": "thinking", "thinking": "t", "signature": {"x": 1}},
        {"type": "redacted_thinking"},
        {"type": "redacted_thinking", "data": ["x"]},
    ]:
        parse(messages=[user(text("q")), assistant(block, text("a")), user(text("more"))])
        parse(messages=[user(block, text("q"))])  # misplaced, still harmless


def test_tools_parse_to_client_and_server_tools():
    req = parse(tools=[WEATHER, TIME, *SERVER_TOOLS])
    assert [type(t) for t in req.tools] == [ClientTool, ClientTool] + [ServerTool] * len(
        SERVER_TOOLS
    )


@pytest.mark.parametrize(
    "choice, kind",
    [
        ({"type": "auto"}, ToolChoiceAuto),
        ({"type": "any"}, ToolChoiceAny),
        ({"type": "tool", "name": "get_weather"}, ToolChoiceTool),
        ({"type": "none"}, ToolChoiceNone),
    ],
)
def test_tool_choices_parse_to_their_model(choice, kind):
    assert isinstance(parse(tools=[WEATHER], tool_choice=choice).tool_choice, kind)


# -- mapping: turns ---------------------------------------------------------------------------


def test_a_string_system_leads_and_string_content_is_one_text():
    assert messages(system="Be brief.", messages=[{"role": "user", "content": "hi"}]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_system_blocks_are_joined_and_cache_control_is_ignored():
    system = [text("You are Claude Code.", cache_control={"type": "ephemeral"}), text("Be terse.")]
    assert messages(system=system)[0] == {
        "role": "system",
        "content": "You are Claude Code.\nBe terse.",
    }


def test_no_or_empty_system_adds_nothing():
    for system in (None, "", [], [text("")]):
        assert messages(system=system) == [{"role": "user", "content": "hi"}]


def test_claude_codes_attribution_line_is_left_out_of_the_system_prompt():
    header = "x-anthropic-billing-header: cc_version=2.1.328.a1b; cc_entrypoint=cli; cch=3f9e2;"
    as_block = messages(system=[text(header), text("You are Claude Code.")])
    as_line = messages(system=[text(f"{header}\nYou are Claude Code.")])
    as_string = messages(system=f"{header}\nYou are Claude Code.")
    for got in (as_block, as_line, as_string):
        assert got[0] == {"role": "system", "content": "You are Claude Code."}
    # Two requests that differ only in the hash give the same prompt (the prefix cache hits).
    other = header.replace("3f9e2", "0aaa9")
    assert messages(system=[text(other), text("You are Claude Code.")]) == as_block
    # Only lines that start with it: a mention elsewhere is text like any other.
    mention = "Do not print x-anthropic-billing-header: lines."
    assert strip_attribution(mention) == mention
    assert messages(system=[text(header)]) == [{"role": "user", "content": "hi"}]


def test_user_text_blocks_are_joined_with_newlines():
    got = messages(messages=[user(text("<system-reminder>ctx</system-reminder>"), text("Hello"))])
    assert got == [{"role": "user", "content": "<system-reminder>ctx</system-reminder>\nHello"}]
    assert messages(messages=[{"role": "user", "content": []}]) == [{"role": "user", "content": ""}]


def test_an_inline_system_turn_stays_where_it_is():
    got = messages(
        system="first",
        messages=[user(text("a")), {"role": "system", "content": "mid"}, user(text("b"))],
    )
    assert got == [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "a"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "b"},
    ]


def test_consecutive_turns_of_one_role_are_one_turn():
    got = messages(
        messages=[
            user(text("one")),
            {"role": "user", "content": "two"},
            assistant(text("Let me look.")),
            assistant(tool_use("t1", city="Paris")),
            user(tool_result("t1", "sunny")),
            user(text("and Rome?")),
        ]
    )
    assert got == [
        {"role": "user", "content": "one\ntwo"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [call("t1", arguments='{"city": "Paris"}')],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "user", "content": "and Rome?"},
    ]


def test_a_tool_round_trip_maps_to_chats_shapes():
    n = mapped(
        tools=[WEATHER],
        messages=[
            user(text("Weather in Paris and Rome?")),
            assistant(
                {"type": "thinking", "thinking": "Two calls.", "signature": "sig"},
                text("Checking both."),
                tool_use("toolu_1", city="Paris"),
                tool_use("toolu_2", city="Rome"),
            ),
            user(
                tool_result("toolu_1", "sunny, 24C"),
                tool_result("toolu_2", [text("rain"), text("9C")]),
            ),
        ],
    ).neutral
    assert list(n.messages) == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                call("toolu_1", arguments='{"city": "Paris"}'),
                call("toolu_2", arguments='{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 24C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "rain\n9C"},
    ]
    assert json.loads(n.messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_tool_results_go_before_the_turns_text_whatever_their_order():
    got = messages(
        messages=[
            user(text("q")),
            assistant(tool_use("t1")),
            user(text("<system-reminder>r</system-reminder>"), tool_result("t1", "done")),
        ]
    )
    assert got[2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "done"},
        {"role": "user", "content": "<system-reminder>r</system-reminder>"},
    ]


def test_tool_use_input_is_json_text_as_written_unicode_included():
    got = messages(
        messages=[
            user(text("q")),
            assistant(tool_use("t1", "write", path="café.txt", lines=[1, 2], opts={})),
            user(tool_result("t1")),
        ]
    )
    arguments = got[1]["tool_calls"][0]["function"]["arguments"]
    assert arguments == '{"path": "café.txt", "lines": [1, 2], "opts": {}}'
    assert got[1]["content"] == ""


@pytest.mark.parametrize(
    "content, is_error, expected",
    [
        ("File not found.", True, "Error: File not found."),
        ([text("a"), text("b")], True, "Error: a\nb"),
        ("", True, "Error"),
        (None, True, "Error"),
        ("fine", False, "fine"),
        ("fine", None, "fine"),
        (None, False, ""),
        ([], False, ""),
    ],
)
def test_tool_result_content_and_is_error(content, is_error, expected):
    result = {"type": "tool_result", "tool_use_id": "t1"}
    if content is not None:
        result["content"] = content
    if is_error is not None:
        result["is_error"] = is_error
    got = messages(messages=[user(text("q")), assistant(tool_use("t1")), user(result)])
    assert got[2] == {"role": "tool", "tool_call_id": "t1", "content": expected}


def test_a_result_without_content_field_at_all_is_empty():
    result = {"type": "tool_result", "tool_use_id": "t1"}
    got = messages(messages=[user(text("q")), assistant(tool_use("t1")), user(result)])
    assert got[2]["content"] == ""


def test_thinking_and_server_tool_blocks_leave_nothing():
    got = messages(
        messages=[
            user(text("q")),
            assistant(
                {"type": "thinking", "thinking": "secret", "signature": "s"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"q": 1}},
                {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
                text("Answer."),
            ),
            user(text("ok")),
        ]
    )
    assert got == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Answer."},
        {"role": "user", "content": "ok"},
    ]
    assert "secret" not in json.dumps(got)


def test_an_assistant_turn_of_thinking_only_is_an_empty_assistant_message():
    got = messages(
        messages=[
            user(text("q")),
            assistant({"type": "thinking", "thinking": "t", "signature": "s"}),
            user(text("go on")),
        ]
    )
    assert got[1] == {"role": "assistant", "content": ""}


def test_a_compaction_summary_is_text_and_a_failed_one_is_nothing():
    got = messages(
        messages=[
            user({"type": "compaction", "content": "Earlier: we fixed the bug."}, text("Next?")),
            assistant({"type": "compaction", "content": None}, text("Sure.")),
            user(text("go")),
        ]
    )
    assert got[:2] == [
        {"role": "user", "content": "Earlier: we fixed the bug.\nNext?"},
        {"role": "assistant", "content": "Sure."},
    ]


def test_a_user_turn_of_dropped_blocks_only_is_still_a_turn():
    got = messages(
        messages=[
            user(text("q")),
            assistant(text("a")),
            user({"type": "web_fetch_tool_result", "tool_use_id": "s", "content": {}}),
        ]
    )
    assert got[-1] == {"role": "user", "content": ""}


# -- mapping: tools and tool choice ----------------------------------------------------------


def test_client_tools_become_chat_tools_and_server_tools_are_ignored():
    m = mapped(tools=[SERVER_TOOLS[0], WEATHER, *SERVER_TOOLS[1:], TIME])
    assert m.neutral.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER["input_schema"],
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    assert m.ignored_tools[:3] == ("web_search", "web_fetch", "bash")
    assert "mcp_toolset" in m.ignored_tools  # no name: its type
    assert len(m.ignored_tools) == len(SERVER_TOOLS)


def test_only_server_tools_offer_nothing():
    m = mapped(tools=SERVER_TOOLS)
    assert m.neutral.tools is None and m.neutral.tool_choice is None


def test_deferred_tools_are_not_offered():
    deferred = {**TIME, "defer_loading": True}
    m = mapped(tools=[WEATHER, deferred])
    assert [t["function"]["name"] for t in m.neutral.tools] == ["get_weather"]
    assert m.ignored_tools == ("get_time",)


def test_two_client_tools_of_one_name_are_a_400():
    err = bad(tools=[WEATHER, TIME, {**WEATHER, "description": "again"}])
    assert err.param == "tools.2.name" and "'get_weather'" in err.message


@pytest.mark.parametrize(
    "choice, tool_choice, parallel",
    [
        (None, None, True),
        ({"type": "auto"}, "auto", True),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any"}, "required", True),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "any", "disable_parallel_tool_use": False}, "required", True),
        (
            {"type": "tool", "name": "get_time"},
            {"type": "function", "function": {"name": "get_time"}},
            True,
        ),
        (
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
            {"type": "function", "function": {"name": "get_time"}},
            False,
        ),
        ({"type": "none"}, "none", True),
    ],
)
def test_tool_choice_maps_to_chats(choice, tool_choice, parallel):
    fields: dict[str, Any] = {"tools": [WEATHER, TIME]}
    if choice is not None:
        fields["tool_choice"] = choice
    n = mapped(**fields).neutral
    assert (n.tool_choice, n.parallel_tool_calls) == (tool_choice, parallel)


def test_auto_and_none_need_no_tools():
    assert mapped(tool_choice={"type": "auto"}).neutral.tool_choice == "auto"
    assert mapped(tool_choice={"type": "none"}).neutral.tool_choice == "none"


@pytest.mark.parametrize(
    "tools, choice, param, message",
    [
        ([], {"type": "any"}, "tool_choice", "needs at least one client tool"),
        (SERVER_TOOLS, {"type": "any"}, "tool_choice", "needs at least one client tool"),
        ([WEATHER], {"type": "tool", "name": "nope"}, "tool_choice.name", "not among the tools"),
        (
            [WEATHER, *SERVER_TOOLS],
            {"type": "tool", "name": "web_search"},
            "tool_choice.name",
            "server tool",
        ),
        (
            [{**WEATHER, "defer_loading": True}],
            {"type": "tool", "name": "get_weather"},
            "tool_choice.name",
            "deferred",
        ),
    ],
)
def test_a_choice_that_cannot_be_honoured_is_a_400(tools, choice, param, message):
    err = bad(tools=tools, tool_choice=choice)
    assert err.param == param and message in err.message


# -- mapping: everything else ----------------------------------------------------------------


def test_sampling_limits_and_stream_map_to_the_neutral_request():
    n = mapped(
        max_tokens=32000,
        temperature=0.2,
        top_p=0.9,
        top_k=40,  # accepted, not applied
        stop_sequences=["END", "\n\nHuman:"],
        stream=True,
    ).neutral
    assert (n.max_tokens, n.temperature, n.top_p, n.stop) == (
        32000,
        0.2,
        0.9,
        ("END", "\n\nHuman:"),
    )
    assert n.stream and n.is_chat and n.prompt_param == "messages"
    assert n.seed is None and not n.logprobs and not n.include_usage


def test_defaults_leave_the_server_defaults():
    n = mapped().neutral
    assert (n.temperature, n.top_p, n.stop, n.stream) == (None, None, (), False)
    assert (n.tools, n.tool_choice, n.response_format) == (None, None, None)
    assert n.parallel_tool_calls


@pytest.mark.parametrize(
    "fields, temperature",
    [({"top_k": 1}, 0.0), ({"top_k": 1, "temperature": 0.7}, 0.0), ({"top_k": 2}, None)],
)
def test_top_k_one_is_greedy(fields, temperature):
    assert mapped(**fields).neutral.temperature == temperature


def test_output_config_format_is_a_json_schema_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    n = mapped(output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    assert n.neutral.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }
    assert n.neutral.format_param == "output_config.format"
    assert mapped(output_config={"effort": "high"}).neutral.response_format is None


@pytest.mark.parametrize(
    "thinking, kind, wants",
    [
        (None, None, False),
        ({"type": "disabled"}, "disabled", False),
        ({"type": "enabled", "budget_tokens": 2048}, "enabled", True),
        ({"type": "adaptive"}, "adaptive", True),
    ],
)
def test_the_thinking_type_is_passed_on(thinking, kind, wants):
    fields = {} if thinking is None else {"thinking": thinking}
    m = mapped(**fields)
    assert (m.thinking, m.wants_thinking, m.model) == (kind, wants, "claude-sonnet-4-5")


# -- Claude Code ------------------------------------------------------------------------------

# Built by hand from what Claude Code 2.1.328 was measured to send (/work/shared/FACTS.md):
# system as blocks with cache_control behind the attribution line, tools among them an MCP
# tool and a server tool, `thinking: adaptive`, `output_config.effort`, `context_management`,
# `metadata`, `max_tokens: 32000`, user turns of several text blocks, then a tool round trip
# with thinking replayed and an error result.
CLAUDE_TOOLS = [
    {
        "name": "Bash",
        "description": "Executes a given bash command.",
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout": {"type": "number"},
                "description": {"type": "string"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Read",
        "description": "Reads a file from the local filesystem.",
        "input_schema": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"file_path": {"type": "string"}, "limit": {"type": "number"}},
            "required": ["file_path"],
            "additionalProperties": False,
        },
    },
    {
        "name": "mcp__docs__search",
        "description": "Search the docs.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        "cache_control": {"type": "ephemeral"},
    },
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},
]


def claude_first_request() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.328.7b4; "
                "cc_entrypoint=cli; cch=eb6c6;",
            },
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "You are an interactive CLI tool that helps users with software "
                "engineering tasks. " * 20,
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "<system-reminder>\nAs you answer the user's questions, you "
                        "can use the following context:\n</system-reminder>",
                    },
                    {
                        "type": "text",
                        "text": "What is in notes.txt?",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            }
        ],
        "tools": CLAUDE_TOOLS,
        "metadata": {"user_id": "user_2f6c_account__session_0199a3e2-5f4c"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "medium"},
        "context_management": {
            "edits": [{"type": "clear_thinking_20251015", "keep": "all"}],
        },
    }


def claude_second_request() -> dict[str, Any]:
    req = claude_first_request()
    req["messages"] += [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "EqQBCkYI"},
                {"type": "text", "text": "Reading the file."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "Read",
                    "input": {"file_path": "/tmp/x/notes.txt"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A",
                    "content": "     1\tbuy milk\n",
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_01B",
                    "name": "Bash",
                    "input": {"command": "wc -l /tmp/x/notes.txt", "description": "Count"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [{"type": "text", "text": "Permission denied."}],
                    "is_error": True,
                },
                {"type": "text", "text": "<system-reminder>Keep going.</system-reminder>"},
            ],
        },
    ]
    return req


def _request_body(data: Any) -> dict[str, Any]:
    """The request body in a captured fixture: the body itself, or under ``body`` /
    ``request`` / ``json`` (a JSON text or an object)."""
    if isinstance(data, dict) and "messages" in data:
        return data
    for key in ("body", "request", "json"):
        inner = data.get(key) if isinstance(data, dict) else None
        if isinstance(inner, str):
            inner = json.loads(inner)
        if isinstance(inner, dict):
            return _request_body(inner)
    raise AssertionError("no Messages request body (with 'messages') found in the fixture")


def _claude_cases() -> list[Any]:
    cases = [
        pytest.param(claude_first_request(), id="hand-built-first-turn"),
        pytest.param(claude_second_request(), id="hand-built-tool-round-trip"),
    ]
    for path in sorted(CLAUDE_FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, list):  # several captured requests in one file
            cases += [pytest.param(d, id=f"{path.name}[{i}]") for i, d in enumerate(data)]
        else:
            cases.append(pytest.param(data, id=path.name))
    return cases


@pytest.mark.parametrize("captured", _claude_cases())
def test_a_claude_code_request_parses_and_maps(captured):
    body_ = _request_body(captured)
    req = parse_messages_request(json.dumps(body_).encode())
    m = to_neutral(req)
    n = m.neutral
    roles = [msg["role"] for msg in n.messages]
    # Claude Code (without --bare) ends with a system turn of environment facts after the
    # user's message; it is mapped where it stands.
    assert "user" in roles and roles[-1] in ("user", "tool", "system")
    assert "x-anthropic-billing-header" not in json.dumps(n.messages)
    if body_.get("system"):
        assert roles[0] == "system"
    # Every client tool is offered (deferred ones aside); server tools are not.
    expected = [
        t["name"]
        for t in body_.get("tools") or []
        if t.get("type") in (None, "custom") and not t.get("defer_loading")
    ]
    assert [t["function"]["name"] for t in n.tools or []] == expected
    calls = {
        b["id"]: b["input"]
        for msg in body_["messages"]
        if msg["role"] == "assistant" and isinstance(msg["content"], list)
        for b in msg["content"]
        if b.get("type") == "tool_use"
    }
    mapped_calls = {
        c["id"]: json.loads(c["function"]["arguments"])
        for msg in n.messages
        for c in msg.get("tool_calls", ())
    }
    assert mapped_calls == calls
    results = [msg["tool_call_id"] for msg in n.messages if msg["role"] == "tool"]
    assert set(results) <= set(calls)
    assert n.max_tokens == body_["max_tokens"] and n.stream is bool(body_.get("stream"))
    assert m.model == body_["model"] and n.prompt_param == "messages"
    if "thinking" in body_:
        assert m.thinking == body_["thinking"]["type"]


def test_the_hand_built_claude_code_requests_map_as_expected():
    first = to_neutral(parse_messages_request(json.dumps(claude_first_request()).encode()))
    n = first.neutral
    assert [t["function"]["name"] for t in n.tools] == ["Bash", "Read", "mcp__docs__search"]
    assert first.ignored_tools == ("web_search",)
    assert n.messages[0]["content"].startswith("You are Claude Code, Anthropic's official CLI")
    assert n.messages[1] == {
        "role": "user",
        "content": "<system-reminder>\nAs you answer the user's questions, you can use the "
        "following context:\n</system-reminder>\nWhat is in notes.txt?",
    }
    assert first.thinking == "adaptive" and first.wants_thinking
    assert (n.max_tokens, n.stream, n.tool_choice) == (32000, True, None)

    second = to_neutral(parse_messages_request(json.dumps(claude_second_request()).encode()))
    assert list(second.neutral.messages[2:]) == [
        {
            "role": "assistant",
            "content": "Reading the file.",
            "tool_calls": [call("toolu_01A", "Read", '{"file_path": "/tmp/x/notes.txt"}')],
        },
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "     1\tbuy milk\n"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call(
                    "toolu_01B",
                    "Bash",
                    '{"command": "wc -l /tmp/x/notes.txt", "description": "Count"}',
                )
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01B", "content": "Error: Permission denied."},
        {"role": "user", "content": "<system-reminder>Keep going.</system-reminder>"},
    ]


def test_the_mapped_claude_code_round_trip_renders_with_the_real_template(model_dir):
    # The shared pipeline's first steps, on the embedded model's tokenizer: the plan and the
    # chat template take the mapped messages and tools as they take Chat's.
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from trioserve.api.tooling import plan_chat
    from trioserve.models.chat_template import chat_prompt_tokens

    tokenizer = load_tokenizer(model_dir)
    n = to_neutral(parse_messages_request(json.dumps(claude_second_request()).encode())).neutral
    plan = plan_chat(n, tokenizer, None)
    assert [t["function"]["name"] for t in plan.tools] == [t["function"]["name"] for t in n.tools]
    rendered = tokenizer.decode(chat_prompt_tokens(tokenizer, n.template_messages(), plan.tools))
    for needle in ["You are Claude Code", "notes.txt", "buy milk", "Error: Permission denied."]:
        assert needle in rendered
    assert "cch=" not in rendered and "I should read it." not in rendered


def test_forced_choices_plan_like_chats(model_dir):
    # `any` and a named tool go through the same grammar as Chat Completions' forced choices.
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from trioserve.api.tooling import plan_chat

    tokenizer = load_tokenizer(model_dir)
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        n = mapped(tools=[WEATHER, TIME], tool_choice=choice).neutral
        plan = plan_chat(n, tokenizer, None)
        assert plan.constraint is not None and plan.constraint_param == "tool_choice"
    n = mapped(tools=[WEATHER], tool_choice={"type": "none"}).neutral
    assert plan_chat(n, tokenizer, None).tools is None
