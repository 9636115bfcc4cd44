"""SSE framing: exact bytes, and that the tests' parser (trioserve.testing.sse), which
follows EventSource's rules, gets every object and comment back."""

import pytest

from trioserve.output import sse
from trioserve.testing.sse import parse_events


def test_data_is_compact_json():
    assert sse.data({"a": 1, "b": [1, 2]}) == b'data: {"a":1,"b":[1,2]}\n\n'


def test_data_keeps_unicode_as_utf8():
    frame = sse.data({"t": "héllo 世界 🙂"})
    assert frame == 'data: {"t":"héllo 世界 🙂"}\n\n'.encode()
    assert b"\\u" not in frame


def test_newlines_in_values_stay_on_one_line():
    frame = sse.data({"t": "a\nb\r\nc"})
    assert frame.count(b"\n") == 2 and frame.endswith(b"\n\n")


def test_data_rejects_nan():
    with pytest.raises(ValueError):
        sse.data({"x": float("nan")})


def test_event():
    assert sse.event("prefill_progress", {"n": 1}) == b'event: prefill_progress\ndata: {"n":1}\n\n'


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb"])
def test_event_rejects_bad_names(name):
    with pytest.raises(ValueError):
        sse.event(name, {})


def test_comment():
    assert sse.comment("keepalive 3/10") == b": keepalive 3/10\n\n"


def test_comment_with_newlines_keeps_framing():
    frame = sse.comment("a\nb\r\nc\rd")
    assert frame == b": a\n: b\n: c\n: d\n\n"
    assert frame.count(b"\n\n") == 1


def test_done():
    assert sse.DONE == b"data: [DONE]\n\n"


def test_parser_recovers_objects():
    objs = [{"id": "x", "choices": [{"delta": {"content": "é\n\n"}}]}, {"choices": []}]
    raw = (
        sse.comment("hello\n\nthere")
        + sse.data(objs[0])
        + sse.event("prefill_progress", {"fraction": 0.5})
        + sse.data(objs[1])
        + sse.DONE
    )
    events = parse_events(raw)
    assert events[0].is_comment and events[0].comments == ("hello", "", "there")
    assert [(e.name, e.data if e.is_done else e.json()) for e in events[1:]] == [
        (None, objs[0]),
        ("prefill_progress", {"fraction": 0.5}),
        (None, objs[1]),
        (None, "[DONE]"),
    ]
