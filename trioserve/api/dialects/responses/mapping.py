"""A ``ResponsesRequest`` mapped into the ``NeutralRequest`` the shared pipeline runs.

Messages become Chat-shaped template messages:

- ``instructions`` is a leading ``system`` message (not carried over by
  ``previous_response_id``, as in OpenAI's API); ``developer`` messages become ``system``;
- a message's text parts are joined with newlines;
- consecutive ``function_call`` (and ``custom_tool_call``) items become one assistant message
  with ``tool_calls``, joined to the assistant message right before them, if any;
- ``function_call_output`` is a ``tool`` message with its ``tool_call_id``;
- ``reasoning`` and the other dropped items leave nothing;
- the stored conversation of ``previous_response_id`` (``history``) goes before the new input.

Tools: each ``function`` tool (OpenAI's flat shape, or Chat's ``{"function": {...}}``) is offered
to the model; a ``namespace`` tool offers its functions under flat names joined with ``__``, as
Codex itself flattens them (``ToolName.flat``: ``mcp__docs__`` + ``search`` is
``mcp__docs__search``); ``tool_names`` maps each flat name back, so a call is reported with
OpenAI's ``name`` and ``namespace``. Functions with ``defer_loading: true`` are left out (they
are meant for OpenAI's hosted tool search, which this server does not run). Every other tool
type (``web_search``, ``file_search``, ``mcp``, ``custom``, ``local_shell``...) is ignored,
never an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trioserve.api.dialects.neutral import NeutralRequest
from trioserve.api.dialects.responses.schema import (
    CustomToolCallItem,
    CustomToolCallOutputItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponsesRequest,
    TextFormat,
)
from trioserve.api.errors import BadRequest

__all__ = [
    "NAMESPACE_SEPARATOR",
    "MappedRequest",
    "ToolName",
    "flat_tool_name",
    "input_messages",
    "to_neutral",
]

NAMESPACE_SEPARATOR = "__"
DEFAULT_FORMAT_NAME = "response"  # json_schema's name when the client gave none
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def flat_tool_name(namespace: str | None, name: str) -> str:
    """The one name the model sees for ``name`` in ``namespace``: Codex's own flattening
    (``ToolName::canonical_flat_name``): the namespace's trailing and the name's leading
    underscores trimmed, joined by ``__``. Without a namespace, the name itself."""
    if not namespace:
        return name
    return f"{namespace.rstrip('_')}{NAMESPACE_SEPARATOR}{name.lstrip('_')}"


@dataclass(frozen=True)
class ToolName:
    """A function as the Responses API names it: ``name``, and ``namespace`` for one that came
    from a ``namespace`` tool. ``flat`` is the name the model sees and calls."""

    name: str
    namespace: str | None = None

    @property
    def flat(self) -> str:
        return flat_tool_name(self.namespace, self.name)


@dataclass(frozen=True)
class MappedRequest:
    """What ``to_neutral`` returns.

    ``neutral``: the request for the shared pipeline. ``conversation``: the template messages
    of ``history`` and this request's input, without ``instructions``: what a stored
    response keeps (with its output appended) for a later ``previous_response_id``.
    ``tool_names``: every function offered to the model, by the flat name it calls it by.
    """

    neutral: NeutralRequest
    conversation: tuple[dict[str, Any], ...]
    tool_names: Mapping[str, ToolName] = field(default_factory=dict)

    def tool_name(self, called: str) -> ToolName:
        """How to report a call the model made as ``called``: its Responses ``name`` and
        ``namespace`` (a name that was not offered comes back as is)."""
        return self.tool_names.get(called) or ToolName(called)


def to_neutral(
    req: ResponsesRequest, history: Sequence[dict[str, Any]] | None = None
) -> MappedRequest:
    """Map a parsed request (and the stored conversation it continues, if any) for the
    shared pipeline. Raises ``BadRequest`` (400) for a malformed function or namespace tool,
    a ``tool_choice`` that names no function offered or forces a tool type this server does
    not run, or a request with no message at all."""
    tools, names = _offered_tools(req.tools or [])
    tool_choice, tools = _tool_choice(req.tool_choice, tools, names)
    new_messages = input_messages(req.input)
    conversation = (*(history or ()), *new_messages)
    if not conversation:
        raise BadRequest("input must contain at least one message.", param="input")
    messages = conversation
    if req.instructions:
        messages = ({"role": "system", "content": req.instructions}, *conversation)
    logprobs = req.want_logprobs
    neutral = NeutralRequest(
        messages=tuple(messages),
        tools=tools or None,
        tool_choice=tool_choice,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=_response_format(req.text.format if req.text else None),
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_strings(),
        logprobs=logprobs,
        top_logprobs=(req.top_logprobs or 0) if logprobs else 0,
        stream=req.stream,
        include_usage=False,
        prediction=req.prediction.text() if req.prediction is not None else None,
        speculation=req.speculation,
        prompt_param="input",
        format_param="text.format",
    )
    return MappedRequest(neutral, tuple(conversation), names)


# -- input items ---------------------------------------------------------------------------


def input_messages(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Input items as template messages (see the module's docstring)."""
    out: list[dict[str, Any]] = []
    joinable = False  # whether out[-1] is an assistant message that a next call joins
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": item.text()})
            joinable = role == "assistant"
        elif isinstance(item, FunctionCallItem | CustomToolCallItem):
            if not joinable:
                out.append({"role": "assistant", "content": ""})
            message = out[-1]
            message["tool_calls"] = [*message.get("tool_calls", ()), _tool_call(item)]
            joinable = True
        elif isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
            message = {"role": "tool", "content": item.text()}
            if item.call_id is not None:
                message["tool_call_id"] = item.call_id
            out.append(message)
            joinable = False
        # reasoning and the dropped item types leave nothing, and join what is around them
    return out


def _tool_call(item: FunctionCallItem | CustomToolCallItem) -> dict[str, Any]:
    arguments = item.arguments if isinstance(item, FunctionCallItem) else item.input
    return {
        "id": item.call_id,
        "type": "function",
        "function": {"name": flat_tool_name(item.namespace, item.name), "arguments": arguments},
    }


# -- tools -----------------------------------------------------------------------------------


def _offered_tools(
    raw: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, ToolName]]:
    """Chat-shaped function tools, and each one's Responses name by its flat name."""
    tools: list[dict[str, Any]] = []
    names: dict[str, ToolName] = {}

    def offer(spec: dict[str, Any], namespace: str | None, where: str) -> None:
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{where}.name must be a non-empty string.", param=f"{where}.name")
        parameters = spec.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(
                f"{where}.parameters must be a JSON schema object.", param=f"{where}.parameters"
            )
        if spec.get("defer_loading") is True:
            return
        tool_name = ToolName(name, namespace)
        if tool_name.flat in names:
            raise BadRequest(
                f"{where}: more than one function tool is named {tool_name.flat!r}.",
                param=f"{where}.name",
            )
        names[tool_name.flat] = tool_name
        function: dict[str, Any] = {"name": tool_name.flat}
        if isinstance(spec.get("description"), str):
            function["description"] = spec["description"]
        function["parameters"] = parameters if parameters is not None else dict(EMPTY_PARAMETERS)
        tools.append({"type": "function", "function": function})

    for i, tool in enumerate(raw):
        where = f"tools.{i}"
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise BadRequest(f"{where}.type must be a string.", param=f"{where}.type")
        if kind == "function":
            chat_shaped = tool.get("function")
            if isinstance(chat_shaped, dict):  # Chat's shape, which the openai SDK also sends
                offer(chat_shaped, None, f"{where}.function")
            else:
                offer(tool, None, where)
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace:
                raise BadRequest(f"{where}.name must be a non-empty string.", param=f"{where}.name")
            members = tool.get("tools")
            if not isinstance(members, list):
                raise BadRequest(f"{where}.tools must be a list.", param=f"{where}.tools")
            for j, member in enumerate(members):
                if isinstance(member, dict) and member.get("type") == "function":
                    offer(member, namespace, f"{where}.tools.{j}")
        # every other type is a tool this server cannot run: not offered, never an error
    return tools, names


def _tool_choice(
    choice: str | dict[str, Any] | None,
    tools: list[dict[str, Any]],
    names: Mapping[str, ToolName],
) -> tuple[str | dict[str, Any] | None, list[dict[str, Any]]]:
    """Chat's ``tool_choice``, and the tools to offer (``allowed_tools`` narrows them)."""
    if choice is None or isinstance(choice, str):
        return choice, tools
    kind = choice.get("type")
    if kind == "function":
        flat = _resolve(choice["name"], choice.get("namespace"), names)
        if flat is None:
            raise BadRequest(
                f"tool_choice names the function {choice['name']!r}, which is not among the "
                f"function tools offered.",
                param="tool_choice",
            )
        return {"type": "function", "function": {"name": flat}}, tools
    if kind == "allowed_tools":
        allowed: set[str] = set()
        for entry in choice["tools"]:
            if entry.get("type") == "function" and isinstance(entry.get("name"), str):
                flat = _resolve(entry["name"], entry.get("namespace"), names)
                if flat is not None:
                    allowed.add(flat)
            elif entry.get("type") == "namespace" and isinstance(entry.get("name"), str):
                allowed.update(f for f, n in names.items() if n.namespace == entry["name"])
            # an allowed tool of a type this server does not run allows nothing here
        return choice["mode"], [t for t in tools if t["function"]["name"] in allowed]
    raise BadRequest(
        f"tool_choice forces a {kind!r} tool, which this server does not run; use 'auto', "
        f"'required', 'none' or a function.",
        param="tool_choice",
    )


def _resolve(name: str, namespace: Any, names: Mapping[str, ToolName]) -> str | None:
    """The flat name of the function a ``tool_choice`` names: by namespace and name, by flat
    name, or by a bare name that only one namespaced function has."""
    if isinstance(namespace, str) and namespace:
        flat = flat_tool_name(namespace, name)
        return flat if flat in names else None
    if name in names:
        return name
    matches = [flat for flat, n in names.items() if n.name == name]
    return matches[0] if len(matches) == 1 else None


# -- text.format -----------------------------------------------------------------------------


def _response_format(fmt: TextFormat | None) -> dict[str, Any] | None:
    """``text.format`` as Chat's ``response_format`` (None: plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": fmt.name or DEFAULT_FORMAT_NAME, "schema": fmt.json_schema}
    if fmt.description is not None:
        spec["description"] = fmt.description
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}
