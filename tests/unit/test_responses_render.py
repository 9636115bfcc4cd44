"""The Responses renderer: OpenAI's event sequence, stable item ids, one final object."""

from __future__ import annotations

import json

from trioserve.api.dialects.responses.render import ResponsesRenderer
from trioserve.engine.events import TokenDelta, Usage
from trioserve.output.pieces import (
    ContentPiece,
    ReasoningPiece,
    ToolCallArguments,
    ToolCallStart,
)

USAGE = Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=3)


def _events(frames: list[bytes]) -> list[dict]:
    out = []
    for frame in frames:
        head, data = frame.decode().split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        out.append(event)
    return out


def _delta(text: str) -> TokenDelta:
    return TokenDelta(1, text)


def test_a_text_answer_streams_the_full_event_sequence():
    r = ResponsesRenderer(model="m", echo={"tools": [], "tool_choice": "auto"})
    frames = r.opening() + r.content_start()
    frames += r.pieces([ContentPiece("Hel")], [_delta("Hel")])
    frames += r.pieces([ContentPiece("lo")], [_delta("lo")])
    frames += r.finish("stop", USAGE)
    events = _events(frames)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in events[3:8])
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"] == r.response_id
    assert final["output"][0]["id"] == item_id
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 3},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 14,
    }
    assert final["tools"] == [] and final["tool_choice"] == "auto"


def test_reasoning_then_text_then_a_call_are_three_items_in_order():
    r = ResponsesRenderer(model="m")
    frames = r.pieces([ReasoningPiece("think")], [_delta("think")])
    frames += r.pieces([ContentPiece("ok")], [_delta("ok")])
    frames += r.pieces([ToolCallStart(0, "call_1", "ls")], [_delta("<")])
    frames += r.pieces([ToolCallArguments(0, '{"a":')], [_delta("x")])
    frames += r.pieces([ToolCallArguments(0, "1}")], [_delta("y")])
    frames += r.finish("tool_calls", USAGE)
    events = _events(frames)
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done and done[0]["arguments"] == '{"a":1}' and done[0]["name"] == "ls"
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    call = final["output"][2]
    assert call["call_id"] == "call_1" and call["arguments"] == '{"a":1}'
    assert all(i["status"] == "completed" for i in final["output"])
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 1


def test_length_is_incomplete_and_an_error_is_an_error_event_then_failed():
    r = ResponsesRenderer(model="m")
    events = _events(r.pieces([ContentPiece("x")], [_delta("x")]) + r.finish("length", USAGE))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    r = ResponsesRenderer(model="m")
    events = _events(r.opening() + r.error("the model failed", "generation_failed", "server_error"))
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "generation_failed"
    assert events[-1]["response"]["error"]["message"] == "the model failed"


def test_a_whole_answer_is_the_same_object_the_stream_ends_with():
    pieces = [ContentPiece("Hi "), ToolCallStart(0, "call_9", "f"), ToolCallArguments(0, "{}")]
    deltas = [_delta("Hi "), _delta("<call>")]
    streamed = ResponsesRenderer(model="m", response_id="resp_1")
    frames = streamed.pieces(pieces, deltas) + streamed.finish("tool_calls", USAGE)
    whole = ResponsesRenderer(model="m", response_id="resp_1").whole(
        pieces, deltas, "tool_calls", USAGE
    )
    final = _events(frames)[-1]["response"]
    for item in final["output"] + whole["output"]:
        item.pop("id")
    final.pop("created_at"), whole.pop("created_at")
    assert whole == final


def test_stored_on_completion_only():
    stored = []
    r = ResponsesRenderer(model="m", on_complete=stored.append)
    r.error("x", "generation_failed", "server_error")
    assert stored == []
    r = ResponsesRenderer(model="m", on_complete=stored.append)
    r.finish("stop", USAGE)
    assert stored and stored[0]["status"] == "completed"
