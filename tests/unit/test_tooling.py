"""A chat request's plan: which tools render, which grammar applies, what is split off."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from trioserve.api.dialects.chat import chat_to_neutral
from trioserve.api.errors import BadRequest
from trioserve.api.schemas import parse_chat_request
from trioserve.api.tooling import (
    build_constraint_processor,
    check_plan,
    plan_chat,
    shaping_for_prompt,
)
from trioserve.engine import constraints
from trioserve.engine.constraints import GrammarProcessor
from trioserve.models.chat_template import chat_prompt_tokens

THINK_TEMPLATE = Path(__file__).parent.parent / "fixtures" / "think_chatml.jinja"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MSG = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def plan(tokenizer, template=None, **body):
    parsed = parse_chat_request(json.dumps({"messages": MSG, **body}).encode())
    return plan_chat(chat_to_neutral(parsed), tokenizer, template)


def test_plain_request_has_no_plan_extras(tokenizer):
    p = plan(tokenizer)
    assert (p.tools, p.constraint, p.shaping) == (None, None, None)


def test_auto_renders_and_parses_but_does_not_constrain(tokenizer):
    p = plan(tokenizer, tools=TOOLS)
    assert p.tools == TOOLS and p.constraint is None
    assert p.shaping.tool_format.start == "<tool_call>" and p.shaping.tool_format.parse is None


def test_none_hides_the_tools(tokenizer):
    p = plan(tokenizer, tools=TOOLS, tool_choice="none")
    assert (p.tools, p.constraint, p.shaping) == (None, None, None)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_choices_constrain(tokenizer, choice):
    p = plan(tokenizer, tools=TOOLS, tool_choice=choice, response_format={"type": "json_object"})
    assert p.constraint.label == "tool_call" and p.constraint_param == "tool_choice"


def test_response_format_constrains(tokenizer):
    p = plan(tokenizer, response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    assert p.constraint.label == "json_schema" and p.shaping is None
    assert plan(tokenizer, response_format={"type": "text"}).constraint is None


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format",
        ),
    ],
)
def test_bad_fields_are_400_naming_the_field(tokenizer, body, param):
    with pytest.raises(BadRequest) as err:
        plan(tokenizer, **body)
    assert err.value.param == param


def test_no_grammar_no_processor(tokenizer):
    assert build_constraint_processor(plan(tokenizer), tokenizer) is None
    assert build_constraint_processor(plan(tokenizer, tools=TOOLS), tokenizer) is None


@pytest.mark.parametrize(
    "body, label",
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_call"),
    ],
)
def test_the_build_returns_a_ready_processor(tokenizer, body, label):
    processor = build_constraint_processor(plan(tokenizer, **body), tokenizer)
    assert isinstance(processor, GrammarProcessor) and processor.label == label


BAD_SCHEMA = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": BAD_SCHEMA}}},
            "response_format",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}
                ],
                "tool_choice": "required",
            },
            "tool_choice",
        ),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_400_at_the_build_not_the_plan(tokenizer, body, param):
    p = plan(tokenizer, **body)  # cheap: nothing converted or compiled yet
    with pytest.raises(BadRequest, match="Unimplemented keys") as err:
        build_constraint_processor(p, tokenizer)
    assert err.value.param == param


async def test_check_plan_builds_once_in_a_thread_and_returns_the_processor(tokenizer, monkeypatch):
    made = []
    real = constraints._new_matcher

    def counting(*args):
        made.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(constraints, "_new_matcher", counting)
    p = plan(tokenizer, response_format={"type": "json_object"})
    assert made == []
    processor = await check_plan(p, tokenizer)
    assert isinstance(processor, GrammarProcessor)
    assert len(made) == 1, "compiled exactly once"
    assert made[0] != threading.get_ident(), "compiled off the Trio thread"
    assert await check_plan(plan(tokenizer), tokenizer) is None


def test_think_template_splits_reasoning_opened_by_the_prompt(tokenizer):
    p = plan(tokenizer, THINK_TEMPLATE.read_text(encoding="utf-8"))
    assert p.shaping.reasoning.start == "<think>" and p.shaping.tool_format is None
    tokens = chat_prompt_tokens(tokenizer, MSG, None, p.template)
    assert shaping_for_prompt(p, tokenizer, tokens).starts_in_reasoning
    assert tokenizer.decode(tokens).endswith("<|im_start|>assistant\n<think>\n")


def test_tools_reach_a_template_that_cannot_render_them(tokenizer):
    # SmolLM2's ChatML ignores tools: they go into the system message, and earlier calls and
    # results are written in the markup the parser reads.
    history = [
        *MSG,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]
    text = tokenizer.decode(chat_prompt_tokens(tokenizer, history, TOOLS))
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in (
        text
    )
    assert "<|im_start|>user\n<tool_response>\nSunny\n</tool_response><|im_end|>" in text
    plain = tokenizer.decode(chat_prompt_tokens(tokenizer, MSG))
    assert "<tools>" not in plain and "SmolLM" in plain  # no tools: the template as it was


def test_parallel_tool_calls_false_forces_exactly_one_call(tokenizer):
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}},
    ]
    several = plan(tokenizer, tools=tools, tool_choice="required")
    one = plan(tokenizer, tools=tools, tool_choice="required", parallel_tool_calls=False)
    assert "start: block+" in several.constraint.grammar()
    assert "start: block\n" in one.constraint.grammar() + "\n"
