"""The Messages renderer: Anthropic's event sequence, block indexes, stop reasons, usage."""

from __future__ import annotations

import json

from trioserve.api.dialects.messages.render import MessagesRenderer
from trioserve.engine.events import TokenDelta, Usage
from trioserve.output.pieces import (
    ContentPiece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)

USAGE = Usage(prompt_tokens=20, completion_tokens=5, cached_tokens=8)


def _events(frames: list[bytes]) -> list[dict]:
    out = []
    for frame in frames:
        head, data = frame.decode().split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        out.append(event)
    return out


def test_thinking_text_and_a_tool_call_are_three_blocks_in_order():
    r = MessagesRenderer(model="claude-x")
    frames = r.opening(20)
    frames += r.pieces([ReasoningPiece("hmm")], [TokenDelta(1, "hmm")])
    frames += r.pieces([ContentPiece("Let me look.")], [TokenDelta(2, "x")])
    frames += r.pieces([ToolCallStart(0, "call_ab", "read")], [])
    frames += r.pieces([ToolCallArguments(0, '{"path": '), ToolCallArguments(0, '"a.txt"}')], [])
    frames += r.finish("tool_calls", USAGE)
    events = _events(frames)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0]["message"]["usage"]["input_tokens"] == 20
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "thinking"),
        (1, "text"),
        (2, "tool_use"),
    ]
    assert starts[2]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_ab",
        "name": "read",
        "input": {},
    }
    json_parts = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    assert "".join(json_parts) == '{"path": "a.txt"}'
    assert kinds.count("content_block_stop") == 3
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 12,
        "output_tokens": 5,
        "cache_read_input_tokens": 8,
        "cache_creation_input_tokens": 0,
    }
    final = r.final
    assert [b["type"] for b in final["content"]] == ["thinking", "text", "tool_use"]
    assert final["content"][2]["input"] == {"path": "a.txt"}


def test_stop_reasons():
    for reason, stop, expected in [
        ("stop", None, "end_turn"),
        ("length", None, "max_tokens"),
        ("stop", "END", "stop_sequence"),
    ]:
        r = MessagesRenderer(model="m")
        events = _events(r.finish(reason, USAGE, stop))
        assert events[0]["delta"] == {"stop_reason": expected, "stop_sequence": stop}


def test_a_whole_answer_is_the_final_message_and_errors_are_anthropic_shaped():
    whole = MessagesRenderer(model="m", message_id="msg_1").whole(
        [ContentPiece("Hi")], [TokenDelta(1, "Hi")], "stop", USAGE
    )
    assert whole["id"] == "msg_1" and whole["type"] == "message"
    assert whole["content"] == [{"type": "text", "text": "Hi"}]
    assert whole["stop_reason"] == "end_turn"
    [error] = _events(MessagesRenderer(model="m").error("busy", "queue_full", "rate_limit_error"))
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert _events([MessagesRenderer(model="m").keepalive()]) == [{"type": "ping"}]
