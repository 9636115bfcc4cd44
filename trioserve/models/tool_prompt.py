"""Tools for chat templates that cannot render them (the embedded SmolLM2's ChatML is one).

Why: a template that ignores ``tools`` leaves the model unaware of them, and drops the
``tool_calls`` of earlier assistant turns. For those templates only, the tools go into the
system message in the Hermes/Qwen2.5 wording, earlier calls are written back as
``<tool_call>{json}</tool_call>`` content and tool results as ``<tool_response>`` user turns:
the same markup the default tool-call parser reads. Templates that mention ``tools`` are used
as they are.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template reads ``tools`` (the same test mlx-lm's server relies on)."""
    return isinstance(template, str) and "tools" in template


def needs_inline_tools(messages: list[dict[str, Any]], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") for m in messages)


def inline_tools(messages: list[dict[str, Any]], tools: list[dict] | None) -> list[dict[str, Any]]:
    """The messages with tools, earlier calls and tool results written as plain text."""
    out = [_plain(m) for m in messages]
    if tools:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    content = message.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        blocks = [_call_block(c) for c in calls]
        text = "\n".join([content, *blocks] if content else blocks)
        return {"role": "assistant", "content": text}
    return {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}


def _call_block(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    body = json.dumps({"name": function.get("name", ""), "arguments": _arguments(function)})
    return f"<tool_call>\n{body}\n</tool_call>"


def _arguments(function: dict[str, Any]) -> Any:
    """OpenAI sends arguments as JSON text: nest it as an object (invalid text stays text)."""
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
