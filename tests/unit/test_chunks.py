"""OpenAI chunk and response shapes, field by field."""

import json

import pytest

from trioserve.engine.events import TokenDelta, TopLogprob, Usage
from trioserve.output import sse
from trioserve.output.chunks import LOGPROB_FLOOR, ChunkBuilder, error_payload

USAGE = Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4)
USAGE_DICT = {
    "prompt_tokens": 7,
    "completion_tokens": 3,
    "total_tokens": 10,
    "prompt_tokens_details": {"cached_tokens": 4},
}
DELTAS = (
    TokenDelta(
        1, "Hi", -0.5, (TopLogprob("Hi", -0.5, (72, 105)), TopLogprob("Yo", -1.5, (89, 111)))
    ),
    TokenDelta(2, " é", float("-inf"), (TopLogprob(" é", -2.0, (32, 195, 169)),)),
)


@pytest.fixture
def chat():
    return ChunkBuilder("chatcmpl-1", 1700000000, "smol", "chat")


@pytest.fixture
def comp():
    return ChunkBuilder("cmpl-1", 1700000000, "smol", "completion")


def head(b, obj):
    return {"id": b.id, "object": obj, "created": b.created, "model": b.model}


def test_new_gives_prefixed_ids():
    a, b = ChunkBuilder.new("chat", "m"), ChunkBuilder.new("chat", "m")
    assert a.id.startswith("chatcmpl-") and a.id != b.id
    assert ChunkBuilder.new("completion", "m").id.startswith("cmpl-")
    assert isinstance(a.created, int)


def test_chat_role_chunk(chat):
    assert chat.role_chunk() == {
        **head(chat, "chat.completion.chunk"),
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }


def test_completion_role_chunk_is_empty_text(comp):
    assert comp.role_chunk() == {
        **head(comp, "text_completion"),
        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}],
    }


def test_chat_content_chunk(chat):
    c = chat.content_chunk("Hello", DELTAS)
    assert c["object"] == "chat.completion.chunk"
    assert c["choices"] == [
        {"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}
    ]


def test_chat_content_chunk_logprobs(chat):
    lp = chat.content_chunk("Hi é", DELTAS, logprobs=True)["choices"][0]["logprobs"]
    assert lp == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                    {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]},
                ],
            },
            {
                "token": " é",
                "logprob": LOGPROB_FLOOR,  # -inf is not JSON
                "bytes": [32, 195, 169],
                "top_logprobs": [{"token": " é", "logprob": -2.0, "bytes": [32, 195, 169]}],
            },
        ]
    }


def test_completion_content_chunk_logprobs_track_offsets(comp):
    first = comp.content_chunk("Hi é", DELTAS, logprobs=True)["choices"][0]
    assert first["text"] == "Hi é"
    assert first["logprobs"] == {
        "tokens": ["Hi", " é"],
        "token_logprobs": [-0.5, LOGPROB_FLOOR],
        "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {" é": -2.0}],
        "text_offset": [0, 2],
    }
    second = comp.content_chunk("!", (TokenDelta(3, "!", -0.1),), logprobs=True)["choices"][0]
    assert second["logprobs"]["text_offset"] == [4]
    assert second["logprobs"]["top_logprobs"] == [{}]


def test_finish_chunks(chat, comp):
    assert chat.finish_chunk("stop")["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert comp.finish_chunk("length")["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]


@pytest.mark.parametrize(
    "kind,obj", [("chat", "chat.completion.chunk"), ("completion", "text_completion")]
)
def test_usage_chunk(kind, obj):
    b = ChunkBuilder("x", 1, "m", kind)
    assert b.usage_chunk(USAGE) == {
        **head(b, obj),
        "choices": [],
        "usage": USAGE_DICT,
    }


@pytest.mark.parametrize(
    "kind,obj", [("chat", "chat.completion.chunk"), ("completion", "text_completion")]
)
def test_progress_chunk_is_a_valid_chunk(kind, obj):
    b = ChunkBuilder("x", 1, "m", kind)
    c = b.progress_chunk(
        status="processing", n_past=256, n_prompt_tokens=1024, fraction=0.25, elapsed_seconds=1.5
    )
    assert c == {
        **head(b, obj),
        "choices": [],
        "status": "processing",
        "n_past": 256,
        "n_prompt_tokens": 1024,
        "fraction": 0.25,
        "elapsed_seconds": 1.5,
        "prompt_progress": {"total": 1024, "processed": 256, "cache": 0, "time_ms": 1500},
    }


def test_progress_chunk_queue_position(chat):
    c = chat.progress_chunk(
        status="queued",
        n_past=0,
        n_prompt_tokens=9,
        fraction=0.0,
        elapsed_seconds=0.0,
        queue_position=2,
    )
    assert c["status"] == "queued" and c["queue_position"] == 2 and c["choices"] == []


def test_id_and_created_stable_across_stream(chat):
    chunks = [
        chat.role_chunk(),
        chat.progress_chunk(
            status="processing", n_past=1, n_prompt_tokens=2, fraction=0.5, elapsed_seconds=0.1
        ),
        chat.content_chunk("a"),
        chat.finish_chunk("stop"),
        chat.usage_chunk(USAGE),
    ]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        ("chatcmpl-1", 1700000000, "smol")
    }


def test_chat_response(chat):
    r = chat.chat_response("Hi é", "stop", USAGE, DELTAS, logprobs=True)
    assert {k: r[k] for k in ("id", "object", "created", "model")} == head(chat, "chat.completion")
    (choice,) = r["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Hi é"}
    assert choice["finish_reason"] == "stop"
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["Hi", " é"]
    assert r["usage"] == USAGE_DICT
    assert chat.chat_response("x", "length", USAGE)["choices"][0]["logprobs"] is None


def test_completion_response(comp):
    comp.content_chunk("ignored running text")  # a response's offsets start at 0 regardless
    r = comp.completion_response("Hi é", "length", USAGE, DELTAS, logprobs=True)
    assert r["object"] == "text_completion" and r["id"] == "cmpl-1"
    (choice,) = r["choices"]
    assert choice["text"] == "Hi é" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["text_offset"] == [0, 2]
    assert r["usage"]["total_tokens"] == 10


def test_error_payload():
    assert error_payload("boom", "server_error") == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    assert error_payload("bad", "invalid_request_error", code="c", param="p")["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": "p",
        "code": "c",
    }


def test_every_payload_encodes_as_strict_json(chat, comp):
    for b in (chat, comp):
        for payload in (
            b.role_chunk(),
            b.content_chunk("Hi é", DELTAS, logprobs=True),
            b.finish_chunk("stop"),
            b.usage_chunk(USAGE),
        ):
            assert json.loads(sse.data(payload)[len(b"data: ") :]) == payload
