"""Reasoning split, the output shaper and the chat chunks it produces."""

from __future__ import annotations

import json

import pytest

from trioserve.engine.events import TokenDelta, TopLogprob, Usage
from trioserve.output.chunks import ChunkBuilder
from trioserve.output.pieces import (
    ContentPiece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)
from trioserve.output.reasoning import ReasoningFormat, ReasoningSplitter
from trioserve.output.shaper import OutputShaper, ShapingSpec, make_shaper, shape_text
from trioserve.output.tool_calls import ToolCallFormat

# Recorded from the embedded SmolLM2 under tests/fixtures/think_chatml.jinja (greedy, few-shot):
# the template opens <think> in the prompt, so the answer starts inside the block.
THINK_OUTPUT = "The capital of France is Paris.\n</think>\nThe answer is Paris."


def split(text: str, size: int, splitter: ReasoningSplitter) -> tuple[str, str]:
    out = []
    for i in range(0, len(text), size):
        out += splitter.feed(text[i : i + size])
    out += splitter.finish()
    reasoning = "".join(p.text for p in out if isinstance(p, ReasoningPiece))
    content = "".join(p.text for p in out if isinstance(p, ContentPiece))
    return reasoning, content


@pytest.mark.parametrize("size", [1, 2, 3, 8, 1000])
def test_reasoning_opened_by_the_prompt(size):
    reasoning, content = split(THINK_OUTPUT, size, ReasoningSplitter(in_reasoning=True))
    assert reasoning == "The capital of France is Paris.\n"
    assert content == "The answer is Paris."


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_reasoning_opened_by_the_model(size):
    text = "<think>\nHmm, 2+2.\n</think>\n\n4"
    reasoning, content = split(text, size, ReasoningSplitter())
    assert (reasoning, content) == ("Hmm, 2+2.\n", "4")


def test_text_without_think_markers_is_all_content():
    assert split("a <thin b", 2, ReasoningSplitter()) == ("", "a <thin b")


def test_unfinished_reasoning_stays_reasoning():
    assert split("still thinking", 3, ReasoningSplitter(in_reasoning=True)) == (
        "still thinking",
        "",
    )


def test_no_spec_means_no_shaper():
    assert make_shaper(None) is None


def test_shaper_splits_reasoning_then_tool_calls():
    spec = ShapingSpec(tool_format=ToolCallFormat(), reasoning=ReasoningFormat())
    text = (
        '<think>I need the weather.</think>\n<tool_call>\n{"name": "w", "arguments": {}}\n'
        "</tool_call>"
    )
    message, reason = shape_text(spec, text, "stop")
    assert message.reasoning == "I need the weather."
    assert message.content == ""
    assert message.tool_calls[0]["function"] == {"name": "w", "arguments": "{}"}
    assert message.tool_calls[0]["type"] == "function"
    assert reason == "tool_calls"


def test_tool_markup_inside_reasoning_is_not_a_call():
    spec = ShapingSpec(tool_format=ToolCallFormat(), reasoning=ReasoningFormat())
    text = '<think>maybe <tool_call>{"name": "w"}</tool_call>?</think>No.'
    message, reason = shape_text(spec, text, "stop")
    assert message.tool_calls == [] and reason == "stop"
    assert message.content == "No."
    assert "<tool_call>" in message.reasoning


def test_length_stays_length_even_after_a_call():
    shaper = OutputShaper(ShapingSpec(tool_format=ToolCallFormat()))
    shaper.feed('<tool_call>{"name": "w", "arguments": {"a": ')
    shaper.finish()
    assert shaper.finish_reason("length") == "length"


def test_streamed_and_whole_shaping_agree():
    spec = ShapingSpec(tool_format=ToolCallFormat())
    text = 'Ok.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
    whole, _ = shape_text(spec, text, "stop")
    shaper = OutputShaper(spec)
    pieces = [p for ch in text for p in shaper.feed(ch)] + shaper.finish()
    chunks = ChunkBuilder("c", 1, "m", "chat").piece_chunks(pieces)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    args = "".join(
        tc["function"].get("arguments", "")
        for c in chunks
        for tc in c["choices"][0]["delta"].get("tool_calls", [])
    )
    assert content == whole.content == "Ok."
    assert json.loads(args) == json.loads(whole.tool_calls[0]["function"]["arguments"])


def test_piece_chunks_shapes():
    b = ChunkBuilder("chatcmpl-1", 1, "m", "chat")
    pieces = [
        ReasoningPiece("hm"),
        ReasoningPiece("m"),
        ContentPiece("Hi"),
        ToolCallStart(0, "call_1", "f"),
        ToolCallArguments(0, '{"a"'),
        ToolCallArguments(0, ": 1}"),
        ToolCallStart(1, "call_2", "g"),
    ]
    deltas = [c["choices"][0]["delta"] for c in b.piece_chunks(pieces)]
    assert deltas == [
        {"reasoning_content": "hmm"},
        {"content": "Hi"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a": 1}'},
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "g", "arguments": ""},
                }
            ]
        },
    ]
    later = b.piece_chunks([ToolCallArguments(1, "{}")])
    assert later[0]["choices"][0]["delta"] == {
        "tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]
    }


def test_piece_chunks_carry_logprobs_once_and_even_when_empty():
    b = ChunkBuilder("chatcmpl-1", 1, "m", "chat")
    delta = TokenDelta(5, "<", -0.25, (TopLogprob("<", -0.25, (60,)),), "<", (60,))
    held = b.piece_chunks([], (delta,), logprobs=True)
    assert len(held) == 1 and held[0]["choices"][0]["delta"] == {"content": ""}
    assert held[0]["choices"][0]["logprobs"]["content"][0]["token"] == "<"
    two = b.piece_chunks([ContentPiece("a"), ReasoningPiece("b")], (delta,), logprobs=True)
    assert two[0]["choices"][0]["logprobs"] is not None
    assert two[1]["choices"][0]["logprobs"] is None


def test_chat_response_with_tool_calls_has_null_content():
    b = ChunkBuilder("chatcmpl-1", 1, "m", "chat")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = b.chat_response("", "tool_calls", Usage(3, 4), tool_calls=calls, reasoning="why")
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "why",
        "tool_calls": calls,
    }
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_chosen_token_text_and_bytes_are_used():
    b = ChunkBuilder("chatcmpl-1", 1, "m", "chat")
    # A token holding half of "é": the text adds nothing yet, the token has its exact byte.
    delta = TokenDelta(9, "", -1.0, (), "\ufffd", (195,))
    entry = b.content_chunk("", (delta,), logprobs=True)["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == "\ufffd" and entry["bytes"] == [195]
