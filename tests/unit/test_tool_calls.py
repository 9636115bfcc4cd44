"""The incremental tool-call parser on recorded model outputs, fed in every chunking."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import qwen3_coder

from trioserve.output.pieces import ContentPiece, ToolCallArguments, ToolCallStart
from trioserve.output.tool_calls import JsonCallScanner, ToolCallFormat, ToolCallParser

# Recorded from the embedded SmolLM2 (greedy, two-shot prompt) and hand-written variants.
ONE_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_CALLS = (
    "Let me look both up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Rome", "opts": {"h24": true}}}'
    "\n</tool_call>\n"
)


def run(text: str, size: int, parser: ToolCallParser | None = None) -> list:
    """Feed ``text`` in chunks of ``size`` characters, then finish."""
    parser = parser or ToolCallParser()
    out = []
    for i in range(0, len(text), size):
        out += parser.feed(text[i : i + size])
    return out + parser.finish()


def gather(pieces: list) -> tuple[str, list[dict]]:
    """(content, calls) as a client would assemble them from the deltas."""
    content, calls = "", []
    for p in pieces:
        if isinstance(p, ContentPiece):
            content += p.text
        elif isinstance(p, ToolCallStart):
            assert p.index == len(calls), "calls start in index order"
            calls.append({"id": p.id, "name": p.name, "arguments": ""})
        elif isinstance(p, ToolCallArguments):
            assert p.index == len(calls) - 1, "arguments belong to the open call"
            calls[p.index]["arguments"] += p.text
    return content, calls


CHUNKINGS = [1, 2, 3, 5, 7, 13, 1000]


@pytest.mark.parametrize("size", CHUNKINGS)
def test_one_call(size):
    content, calls = gather(run(ONE_CALL, size))
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("size", CHUNKINGS)
def test_several_calls_and_leading_content(size):
    content, calls = gather(run(TWO_CALLS, size))
    assert content == "Let me look both up."  # the newlines around the calls are not content
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": [1, 2]}
    assert json.loads(calls[1]["arguments"]) == {"zone": "Europe/Rome", "opts": {"h24": True}}
    assert len({c["id"] for c in calls}) == 2


def test_arguments_stream_in_increments():
    pieces = run(ONE_CALL, 1)
    starts = [p for p in pieces if isinstance(p, ToolCallStart)]
    args = [p.text for p in pieces if isinstance(p, ToolCallArguments)]
    assert len(starts) == 1
    assert len(args) > 5, "arguments come as they are generated, not in one delta"
    # The start precedes every arguments delta.
    assert pieces.index(starts[0]) < min(
        i for i, p in enumerate(pieces) if isinstance(p, ToolCallArguments)
    )


def test_markup_split_at_every_point_never_leaks():
    text = "Sure." + ONE_CALL + " Done."
    for cut in range(1, len(text)):
        parser = ToolCallParser()
        pieces = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.finish()
        content, calls = gather(pieces)
        assert content == "Sure. Done.", cut
        assert len(calls) == 1 and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_no_markup_in_content_while_a_call_is_open():
    parser = ToolCallParser()
    seen = ""
    for ch in ONE_CALL:
        for p in parser.feed(ch):
            if isinstance(p, ContentPiece):
                seen += p.text
    assert "<" not in seen and "tool_call" not in seen


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_plain_text_passes_through_exactly(size):
    text = "No tools here: a < b, <tool is not a call, and x </tool_call> neither.\n\n"
    content, calls = gather(run(text, size))
    assert content == text and calls == []


def test_malformed_json_comes_back_as_content():
    text = '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'
    content, calls = gather(run(text, 3))
    assert calls == []
    assert content == text


def test_not_json_at_all_comes_back_as_content():
    text = 'Calling: <tool_call>get_weather(city="Paris")</tool_call>'
    content, calls = gather(run(text, 2))
    assert calls == [] and content == text


def test_end_marker_inside_a_json_string_is_text():
    text = '<tool_call>{"name": "echo", "arguments": {"s": "a</tool_call>b"}}</tool_call>'
    content, calls = gather(run(text, 1))
    assert content == ""
    assert json.loads(calls[0]["arguments"]) == {"s": "a</tool_call>b"}


def test_arguments_given_as_a_json_string_are_unwrapped():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    _, calls = gather(run(text, 2))
    assert json.loads(calls[0]["arguments"]) == {"a": 1}


def test_keys_in_any_order_and_parameters_alias():
    text = '<tool_call>{"parameters": {"q": "x"}, "name": "search"}</tool_call>'
    _, calls = gather(run(text, 1))
    assert calls[0]["name"] == "search" and json.loads(calls[0]["arguments"]) == {"q": "x"}


def test_missing_arguments_are_an_empty_object():
    _, calls = gather(run('<tool_call>{"name": "now"}</tool_call>', 4))
    assert calls == [{"id": calls[0]["id"], "name": "now", "arguments": "{}"}]


def test_missing_end_marker_still_returns_the_call():
    _, calls = gather(run('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', 3))
    assert json.loads(calls[0]["arguments"]) == {"a": 1}


def test_cut_off_call_keeps_what_was_generated():
    # max_tokens in the middle of the arguments: the call stands with partial arguments.
    _, calls = gather(run('<tool_call>\n{"name": "f", "arguments": {"a": 1', 3))
    assert calls[0]["name"] == "f" and calls[0]["arguments"] == '{"a": 1'


def test_cut_off_before_the_name_is_dropped():
    content, calls = gather(run('Hi <tool_call>\n{"name": "get_w', 3))
    assert content == "Hi" and calls == []


def test_partial_start_marker_at_the_end_is_content():
    content, calls = gather(run("a <tool_ca", 2))
    assert content == "a <tool_ca" and calls == []


def test_family_parser_for_non_json_calls():
    fmt = ToolCallFormat(
        qwen3_coder.tool_call_start,
        qwen3_coder.tool_call_end,
        qwen3_coder.parse_tool_call,
        "qwen3_coder",
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"days": {"type": "integer"}}},
            },
        }
    ]
    text = (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    content, calls = gather(run(text, 4, ToolCallParser(fmt, tools)))
    assert content == "Checking."
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"days": 3}


def test_scanner_finds_name_and_arguments_span():
    scan = JsonCallScanner()
    body = '  {"id": 7, "name": "f\\u00e9", "arguments": {"x": [1, "}"]}, "extra": null}  '
    scan.advance(body, len(body))
    assert scan.closed and not scan.invalid
    assert scan.name == "fé"
    assert scan.arguments_so_far() == '{"x": [1, "}"]}'
