"""A ``MessagesRequest`` mapped into the ``NeutralRequest`` the shared pipeline runs.

Turns become Chat-shaped template messages:

- ``system`` is a leading ``system`` message, its text blocks joined with newlines; an inline
  ``system`` turn is a ``system`` message where it stands;
- consecutive turns of the same role are one turn, as Anthropic combines them;
- a user turn's ``tool_result`` blocks are one ``tool`` message each (``tool_call_id``, the
  content's text blocks joined), before a ``user`` message with the turn's text, if it has any
  (a turn of tool results only is tool messages only). ``is_error: true`` prefixes the text
  with ``"Error: "``: chat templates have no error flag, and the model should know;
- an assistant turn is one ``assistant`` message: its text blocks joined are ``content``, its
  ``tool_use`` blocks are ``tool_calls`` (``arguments``: the ``input`` as JSON text);
- ``thinking``, ``redacted_thinking`` and the blocks of server tools leave nothing; a
  ``compaction`` block's summary is text.

Claude Code starts its system prompt with an ``x-anthropic-billing-header: ...; cch=...;`` line
whose hash changes on every request: kept, it would make every prompt differ from its first
line on and defeat the prefix cache (50-80 KB prompts prefilled from scratch each turn). It means
nothing to the model, so such lines are removed from system text (sglang, vllm-mlx and Ollama do
the same).

Tools: each client tool is offered as a Chat function (``input_schema`` as ``parameters``);
tools with ``defer_loading: true`` are left out (they are meant for Anthropic's server-side tool
search, which this server does not run), and so are server and Anthropic-defined tools
(``ignored_tools`` names them). ``tool_choice``: ``auto`` is ``"auto"``, ``any`` is
``"required"``, ``tool`` is Chat's named function, ``none`` is ``"none"``;
``disable_parallel_tool_use: true`` is ``parallel_tool_calls=False`` (a forced choice then
yields exactly one call). ``output_config.format`` is Chat's ``json_schema`` response format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trioserve.api.dialects.messages.schema import (
    ClientTool,
    CompactionBlock,
    Message,
    MessagesRequest,
    OutputConfig,
    ServerTool,
    TextBlock,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from trioserve.api.dialects.neutral import NeutralRequest
from trioserve.api.errors import BadRequest

__all__ = [
    "DEFAULT_FORMAT_NAME",
    "ERROR_PREFIX",
    "MappedMessages",
    "strip_attribution",
    "template_messages",
    "to_neutral",
]

ERROR_PREFIX = "Error: "  # before the text of a tool_result with is_error: true
DEFAULT_FORMAT_NAME = "response"  # the json_schema name Chat's response_format wants
# Claude Code's per-request attribution line (see the module's docstring).
_ATTRIBUTION = re.compile(r"^x-anthropic-billing-header:[^\n]*(?:\n|$)", re.MULTILINE)


@dataclass(frozen=True)
class MappedMessages:
    """What ``to_neutral`` returns.

    ``neutral``: the request for the shared pipeline. ``model``: the model id as asked for.
    ``thinking``: the ``thinking.type`` the client sent (``enabled``, ``adaptive``,
    ``disabled``...), None without one; a local model thinks as its chat template says, so this
    only tells the renderer what the client expects. ``ignored_tools``: the server and deferred
    tools left out, by name (or type), for logs.
    """

    neutral: NeutralRequest
    model: str
    thinking: str | None = None
    ignored_tools: tuple[str, ...] = ()

    @property
    def wants_thinking(self) -> bool:
        """Whether the client turned thinking on (any type but ``disabled``)."""
        return self.thinking not in (None, "disabled")


def to_neutral(req: MessagesRequest) -> MappedMessages:
    """Map a parsed request for the shared pipeline. Raises ``BadRequest`` (400) for two client
    tools of one name, or a ``tool_choice`` that forces a tool when none is offered, or names a
    tool that is not offered."""
    tools, ignored = _offered_tools(req.tools or [])
    tool_choice, parallel = _tool_choice(req, tools, ignored)
    messages = template_messages(req.messages, _system_text(req.system))
    # top_k 1 always takes the likeliest token: greedy, which temperature 0 is. The engine has
    # no top-k sampling, so any other top_k is accepted and not applied.
    temperature = 0.0 if req.top_k == 1 else req.temperature
    neutral = NeutralRequest(
        messages=tuple(messages),
        tools=tools or None,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=_response_format(req.output_config),
        max_tokens=req.max_tokens,
        temperature=temperature,
        top_p=req.top_p,
        stop=tuple(req.stop_sequences or ()),
        stream=req.stream,
        prompt_param="messages",
        format_param="output_config.format",
    )
    thinking = req.thinking.type if req.thinking is not None else None
    return MappedMessages(neutral, req.model, thinking, tuple(ignored))


# -- turns -----------------------------------------------------------------------------------


def strip_attribution(text: str) -> str:
    """``text`` without Claude Code's ``x-anthropic-billing-header:`` lines."""
    return _ATTRIBUTION.sub("", text) if "x-anthropic-billing-header:" in text else text


def _system_text(blocks: Iterable[Any]) -> str:
    texts = [strip_attribution(b.text) for b in blocks if isinstance(b, TextBlock)]
    return "\n".join(t for t in texts if t)


def template_messages(turns: Sequence[Message], system: str = "") -> list[dict[str, Any]]:
    """The turns (after a ``system`` text, if any) as template messages (see the module's
    docstring)."""
    out: list[dict[str, Any]] = []
    system = strip_attribution(system)
    if system:
        out.append({"role": "system", "content": system})
    for role, blocks in _merged(turns):
        if role == "system":
            if content := _system_text(blocks):
                out.append({"role": "system", "content": content})
        elif role == "assistant":
            out.append(_assistant_message(blocks))
        else:
            out += _user_messages(blocks)
    return out


def _merged(turns: Sequence[Message]) -> list[tuple[str, list[Any]]]:
    """Consecutive user (or assistant) turns as one; system turns stay apart."""
    merged: list[tuple[str, list[Any]]] = []
    for turn in turns:
        if merged and turn.role != "system" and merged[-1][0] == turn.role:
            merged[-1][1].extend(turn.content)
        else:
            merged.append((turn.role, list(turn.content)))
    return merged


def _texts(blocks: Iterable[Any]) -> list[str]:
    out = []
    for block in blocks:
        if isinstance(block, TextBlock):
            out.append(block.text)
        elif isinstance(block, CompactionBlock) and block.content:
            out.append(block.content)
    return out


def _assistant_message(blocks: list[Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(_texts(blocks))}
    calls = [_tool_call(b) for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(block: ToolUseBlock) -> dict[str, Any]:
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)},
    }


def _user_messages(blocks: list[Any]) -> list[dict[str, Any]]:
    results = [b for b in blocks if isinstance(b, ToolResultBlock)]
    out = [
        {"role": "tool", "tool_call_id": r.tool_use_id, "content": _result_text(r)} for r in results
    ]
    texts = _texts(blocks)
    if texts or not results:  # a turn with neither is still a (blank) user turn
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _result_text(result: ToolResultBlock) -> str:
    text = result.text()
    if result.is_error:
        return f"{ERROR_PREFIX}{text}" if text else ERROR_PREFIX.rstrip(": ")
    return text


# -- tools -----------------------------------------------------------------------------------


def _offered_tools(raw: Sequence[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat-shaped function tools, and the names (or types) of the tools left out."""
    tools: list[dict[str, Any]] = []
    ignored: list[str] = []
    names: set[str] = set()
    for i, tool in enumerate(raw):
        if isinstance(tool, ServerTool):
            ignored.append(tool.name or tool.type)
            continue
        assert isinstance(tool, ClientTool)
        if tool.name in names:
            raise BadRequest(
                f"Invalid request: tools.{i}.name: more than one tool is named {tool.name!r}.",
                param=f"tools.{i}.name",
            )
        names.add(tool.name)
        if tool.defer_loading:
            ignored.append(tool.name)
            continue
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.input_schema
        tools.append({"type": "function", "function": function})
    return tools, ignored


def _tool_choice(
    req: MessagesRequest, tools: list[dict[str, Any]], ignored: list[str]
) -> tuple[str | dict[str, Any] | None, bool]:
    """Chat's ``tool_choice`` and ``parallel_tool_calls``."""
    choice = req.tool_choice
    if choice is None:
        return None, True
    if isinstance(choice, ToolChoiceNone):
        return "none", True
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, ToolChoiceAuto):
        return "auto", parallel
    offered = {t["function"]["name"] for t in tools}
    if isinstance(choice, ToolChoiceAny):
        if not offered:
            raise BadRequest(
                "Invalid request: tool_choice: type 'any' needs at least one client tool in "
                "tools (server tools are not run by this server).",
                param="tool_choice",
            )
        return "required", parallel
    assert isinstance(choice, ToolChoiceTool)
    if choice.name not in offered:
        why = (
            "a server tool or a deferred one, which this server does not offer the model"
            if choice.name in ignored
            else "not among the tools"
        )
        raise BadRequest(
            f"Invalid request: tool_choice.name: {choice.name!r} is {why}.",
            param="tool_choice.name",
        )
    return {"type": "function", "function": {"name": choice.name}}, parallel


# -- output_config -----------------------------------------------------------------------------


def _response_format(config: OutputConfig | None) -> dict[str, Any] | None:
    """``output_config.format`` as Chat's ``response_format`` (None: plain text)."""
    if config is None or config.format is None:
        return None
    spec = {"name": DEFAULT_FORMAT_NAME, "schema": config.format.json_schema}
    return {"type": "json_schema", "json_schema": spec}
