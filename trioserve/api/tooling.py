"""What a chat request asks beyond plain text, turned into one plan before generation.

``tools``/``tool_choice`` decide which tools the template renders, whether tool calls are parsed
and whether a grammar forces one; ``response_format`` becomes a grammar too; the chat template
decides whether ``<think>`` reasoning is split off. The plan holds plain values only: the
tools to render, a ``Constraint`` (the grammar, not yet converted or compiled) and a
``ShapingSpec`` for the output shaper.
Everything a client can get wrong here is a 400 naming the field, raised before submit.

``plan_chat`` is cheap and runs on the Trio thread: the ``Constraint`` it makes converts nothing.
``build_constraint_processor`` does the costly part (schema to grammar, the grammar compile,
llguidance's tokenizer the first time) once, in the request's prepare thread, and returns the
sequence's ready logits processor for the worker.

Precedence: a forced ``tool_choice`` (``required`` or a named function) constrains the output
to tool calls; otherwise ``response_format`` constrains it to JSON, and tool calls cannot occur.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import trio

from trioserve.api.dialects.neutral import NeutralRequest
from trioserve.api.errors import BadRequest
from trioserve.engine.constraints import (
    Constraint,
    ConstraintError,
    GrammarProcessor,
    build_processor,
    json_object_constraint,
    json_schema_constraint,
    tool_call_constraint,
)
from trioserve.output.reasoning import ReasoningFormat
from trioserve.output.shaper import ShapingSpec
from trioserve.output.tool_calls import ToolCallFormat

log = logging.getLogger(__name__)

JSON_FAMILIES = (None, "json_tools")  # bodies are {"name", "arguments"} JSON: streamed


@dataclass(frozen=True)
class ChatPlan:
    template: str | None  # the --chat-template text, or None for the model's own
    tools: list[dict[str, Any]] | None  # what the template renders (None: no tools)
    constraint: Constraint | None
    constraint_param: str | None  # the request field a compile error is reported against
    shaping: ShapingSpec | None


def plan_chat(parsed: NeutralRequest, tokenizer: Any, template: str | None) -> ChatPlan:
    """The plan for one chat request; raises ``BadRequest`` for bad tools or formats.

    ``template`` is the ``--chat-template`` text, read once at start-up (None: the model's).
    """
    tools = _checked_tools(parsed.tools)
    mode, forced_name = _tool_choice(parsed.tool_choice, tools)
    use_tools = tools if mode != "none" else []
    fmt = tool_format(tokenizer, template) if use_tools else None
    constraint, param = None, None
    if mode in ("required", "named"):
        assert fmt is not None
        several = forced_name is None and parsed.parallel_tool_calls
        constraint, param = _forced_call(fmt, use_tools, forced_name, several), "tool_choice"
    elif parsed.response_format is not None:
        param = parsed.format_param
        constraint = response_constraint(parsed.response_format, param)
    reasoning = reasoning_format(tokenizer, template)
    shaping = None
    if fmt is not None or reasoning is not None:
        shaping = ShapingSpec(tool_format=fmt, tools=tuple(use_tools), reasoning=reasoning)
    return ChatPlan(template, use_tools or None, constraint, param, shaping)


def build_constraint_processor(plan: ChatPlan, tokenizer: Any) -> GrammarProcessor | None:
    """The plan's grammar compiled once into the sequence's ready logits processor (None: no
    grammar). A grammar that cannot compile is a ``BadRequest`` (400) with llguidance's reason,
    against ``plan.constraint_param``.

    Sync and costly (schema to grammar, the compile; the first call per tokenizer also builds
    llguidance's tokenizer, about a second): call it inside the request's
    ``trio.to_thread.run_sync`` prepare step, never on the Trio thread nor on the MLX thread.
    The processor serves that one request's sequence only.
    """
    if plan.constraint is None:
        return None
    try:
        return build_processor(plan.constraint, tokenizer)
    except ConstraintError as exc:
        raise BadRequest(str(exc), param=plan.constraint_param) from None


async def check_plan(plan: ChatPlan, tokenizer: Any) -> GrammarProcessor | None:
    """``build_constraint_processor`` in a worker thread, for callers without a prepare step of
    their own: raises the same ``BadRequest`` and returns the ready processor."""
    if plan.constraint is None:
        return None
    return await trio.to_thread.run_sync(build_constraint_processor, plan, tokenizer)


def shaping_for_prompt(plan: ChatPlan, tokenizer: Any, tokens: list[int]) -> ShapingSpec | None:
    """The shaping spec, knowing whether the rendered prompt left a think block open."""
    spec = plan.shaping
    if spec is None or spec.reasoning is None:
        return spec
    tail = tokenizer.decode(list(tokens[-64:]))
    opened = tail.rfind(spec.reasoning.start) > tail.rfind(spec.reasoning.end)
    return replace(spec, starts_in_reasoning=opened)


# -- request fields ------------------------------------------------------------------------


def _checked_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise BadRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", param="tools"
            )
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"tools[{i}].function.name must be a non-empty string.", param="tools")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequest(
                f"tools[{i}].function.parameters must be a JSON schema object.", param="tools"
            )
    return list(tools or [])


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[dict]) -> tuple[str, str | None]:
    """``(mode, name)``: mode is none, auto, required or named."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadRequest(
                f"tool_choice must be 'none', 'auto', 'required' or a function, not {choice!r}.",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise BadRequest("tool_choice 'required' needs tools.", param="tool_choice")
        return choice, None
    function = choice.get("function") if choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest(
            "tool_choice must look like {'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names {name!r}, which is not in tools.", param="tool_choice")
    return "named", name


def _forced_call(
    fmt: ToolCallFormat, tools: list[dict], name: str | None, several: bool
) -> Constraint:
    if fmt.parse is not None:
        raise BadRequest(
            f"tool_choice can force a call only for JSON tool calls; this model writes its "
            f"calls in the {fmt.family!r} format. Use 'auto'.",
            param="tool_choice",
        )
    calls = [
        (t["function"]["name"], t["function"].get("parameters") or {"type": "object"})
        for t in tools
        if name is None or t["function"]["name"] == name
    ]
    return tool_call_constraint(calls, fmt.start, fmt.end, several=several)


def response_constraint(
    response_format: dict[str, Any], param: str = "response_format"
) -> Constraint | None:
    """``response_format`` as a grammar: None for text; 400 for anything unknown. Cheap: the
    schema is converted and compiled later, by ``build_constraint_processor``."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_object_constraint()
    if kind != "json_schema":
        raise BadRequest(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}.",
            param=param,
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("response_format.json_schema must be an object.", param=param)
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest(
            "response_format.json_schema.schema must be a JSON schema object.",
            param=param,
        )
    return json_schema_constraint(schema)


# -- what the model and template look like -------------------------------------------------


@lru_cache(maxsize=8)
def tool_format(tokenizer: Any, template: str | None) -> ToolCallFormat:
    """The tool-call markup for this model: mlx-lm's family for its template, else Hermes."""
    family = _family(tokenizer, template)
    if family in JSON_FAMILIES:
        return ToolCallFormat()
    module = importlib.import_module(f"mlx_lm.tool_parsers.{family}")
    return ToolCallFormat(
        module.tool_call_start, module.tool_call_end, module.parse_tool_call, family
    )


def _family(tokenizer: Any, template: str | None) -> str | None:
    if template is None:  # mlx-lm inferred it when it loaded the tokenizer
        parser = getattr(tokenizer, "tool_parser", None)
        module = getattr(parser, "__module__", "") or ""
        return module.rsplit(".", 1)[-1] if module.startswith("mlx_lm.tool_parsers.") else None
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    class _Shim:  # what mlx-lm's inference reads: the template and the vocabulary
        chat_template = template

        @staticmethod
        def get_vocab() -> dict[str, int]:
            return tokenizer.get_vocab()

    return _infer_tool_parser(_Shim())


def reasoning_format(tokenizer: Any, template: str | None) -> ReasoningFormat | None:
    """Think markers when the template uses them (the model's own markers if mlx-lm knows
    them, else ``<think>``/``</think>``); None for templates without reasoning."""
    text = template if template is not None else getattr(tokenizer, "chat_template", None)
    if not isinstance(text, str):
        return None
    fmt = ReasoningFormat()
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    if getattr(tokenizer, "has_thinking", False) and start and end:
        fmt = ReasoningFormat(start, end)
    return fmt if fmt.start in text else None
