"""Nothing the model writes reaches the log above debug level (README: answers only at
debug): the tool-call parser's three complaints log a length or an exception type at
info/warning, and the model's text only at debug."""

from __future__ import annotations

import logging

import pytest

from trioserve.output.tool_calls import ToolCallFormat, ToolCallParser

SECRET = "s3cr3t-model-text"


def run(parser: ToolCallParser, text: str) -> None:
    for i in range(0, len(text), 3):
        parser.feed(text[i : i + 3])
    parser.finish()


def failing_parse(body: str, tools: object) -> object:
    raise ValueError(f"cannot parse {body!r}")  # as family parsers do: quoting the input


@pytest.mark.parametrize(
    ("make_parser", "text", "level"),
    [
        # malformed JSON in the markup: returned as content, with a warning
        (ToolCallParser, f'<tool_call>{{"name": {SECRET}}}</tool_call>', logging.WARNING),
        # cut off before its name: dropped, with an info line
        (ToolCallParser, f'<tool_call>{{"na{SECRET}', logging.INFO),
        # a family parser that raises with the model's text in its message
        (
            lambda: ToolCallParser(ToolCallFormat("<call>", "</call>", failing_parse, "fake")),
            f"<call>{SECRET}</call>",
            logging.WARNING,
        ),
    ],
)
def test_model_text_is_logged_at_debug_only(caplog, make_parser, text, level):
    caplog.set_level(logging.DEBUG, logger="trioserve")
    run(make_parser(), text)
    above_debug = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert any(r.levelno == level for r in above_debug), "the event is still reported"
    for record in above_debug:
        assert SECRET not in record.getMessage(), record.getMessage()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(SECRET in m for m in debug), "the text is there for whoever turns on debug"
