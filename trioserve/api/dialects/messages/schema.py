"""The request body of ``POST /v1/messages`` (Anthropic's Messages API), validated at the edge.

Follows Anthropic's reference (the anthropic SDK's ``MessageCreateParams``, 2.16): unknown fields
are ignored, and every problem is a 400 whose ``param`` names the field
(``messages.0.content.1``).

``messages`` are turns of role ``user``, ``assistant`` (and ``system``, which the SDK allows
inline), their ``content`` a string (one text block) or a list of blocks:

- ``text``; ``tool_use`` (assistant turns) and ``tool_result`` (user turns; its content a string
  or text blocks, ``tool_reference`` blocks in it are dropped); a block in the wrong role's turn
  is a 400;
- ``thinking`` / ``redacted_thinking``, replayed by clients: accepted whatever they hold, never
  an error (the mapping drops them);
- ``compaction`` (a summary of earlier context): kept as text;
- ``image``, ``document``, ``search_result``, ``container_upload`` (and ``browser_state`` in a
  tool result): a 400 naming the block, "only text content is supported" (this server reads
  text only);
- the blocks of server tools (``server_tool_use``, ``web_search_tool_result``, ``mcp_tool_use``...
  ``DROPPED_BLOCK_TYPES``): history of tools this server does not run; accepted and dropped;
- any other type: a 400 naming the block.

A conversation that ends with an assistant turn asks Anthropic to continue that partial answer
(prefill); the chat templates here always open a new turn, so it is a 400, as Anthropic answers
for models without prefill.

``tools``: client tools (``type`` absent or ``custom``) need a ``name`` and an ``input_schema``;
every other ``type`` (``web_search_20250305``, ``bash_20250124``, ``text_editor_...``,
``computer_...``, ``mcp_toolset``, a type from the future) is a server or Anthropic-defined tool:
accepted here, ignored by the mapping.

Accepted and not applied: ``metadata``, ``service_tier``, ``context_management``, ``container``,
``mcp_servers`` (this server connects to none; their tools are simply not offered),
``output_config.effort``, ``thinking`` (its type is passed on for the renderer), ``top_k`` (the
engine has no top-k sampling; ``top_k: 1`` is greedy and mapped to temperature 0), ``cache_control``
anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from trioserve.api.errors import BadRequest
from trioserve.api.schemas import MAX_STOP_CHARS, parse_body

__all__ = [
    "DROPPED_BLOCK_TYPES",
    "MAX_STOP_SEQUENCES",
    "REFUSED_BLOCK_TYPES",
    "ClientTool",
    "CompactionBlock",
    "DroppedBlock",
    "Message",
    "MessagesRequest",
    "OutputConfig",
    "OutputFormat",
    "RedactedThinkingBlock",
    "ServerTool",
    "TextBlock",
    "ThinkingBlock",
    "ThinkingConfig",
    "ToolChoice",
    "ToolChoiceAny",
    "ToolChoiceAuto",
    "ToolChoiceNone",
    "ToolChoiceTool",
    "ToolResultBlock",
    "ToolUseBlock",
    "joined_text",
    "parse_messages_request",
]

# Anthropic documents no limit on the number of stop sequences, and clients do send more than
# Chat's four. The stop filter's cost grows linearly with their count: measured on this 2-core
# CPU at 256 characters each, 0.017 ms a token for 4 stops, 0.024 for 16, 0.043 for 32 (a
# decode step is ~130 ms). 16 is generous for real clients and keeps the per-token cost bounded;
# each one is capped at ``MAX_STOP_CHARS`` like Chat's (see ``api.schemas``).
MAX_STOP_SEQUENCES = 16

# Blocks that carry what this text-only server cannot read: a 400 naming the block.
REFUSED_BLOCK_TYPES = frozenset(
    {"image", "document", "search_result", "container_upload", "browser_state"}
)
# Blocks that record what server tools did (the anthropic SDK's ``ContentBlockParam`` and
# ``BetaContentBlockParam``, 2.16): accepted in a turn and dropped, since this server runs none
# of those tools. ``tool_reference`` appears inside ``tool_result`` content (tool search).
DROPPED_BLOCK_TYPES = frozenset(
    {
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "advisor_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "mcp_tool_listing",
        "tool_addition",
        "tool_removal",
        "tool_reference",
        "fallback",
    }
)
_MAPPED_BLOCK_TYPES = (
    "text",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "compaction",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- content blocks --------------------------------------------------------------------------


class TextBlock(_Model):
    """A text block; ``cache_control`` and ``citations`` are accepted and ignored."""

    type: Literal["text"]
    text: str


class ToolUseBlock(_Model):
    """A call the model made earlier (an assistant turn), replayed by the client."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ThinkingBlock(_Model):
    """Reasoning a client replays: accepted whatever it holds, never read."""

    type: Literal["thinking"]
    thinking: Any = None
    signature: Any = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: Any = None


class CompactionBlock(_Model):
    """A summary of earlier context (Anthropic's compaction); ``content`` None: a failed one."""

    type: Literal["compaction"]
    content: str | None = None


class DroppedBlock(_Model):
    """A block of one of ``DROPPED_BLOCK_TYPES``: accepted and dropped, fields unchecked."""

    type: str


def _refusing(reason: Callable[[Any], str]) -> type[_Model]:
    """A model that refuses every value with ``reason(value)``: a union member that turns one
    block kind into one clear message (not one error per union member)."""

    class Refused(_Model):
        @model_validator(mode="before")
        @classmethod
        def _refuse(cls, value: Any) -> Any:
            raise ValueError(reason(value))

    return Refused


def _type_of(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def _not_text(value: Any) -> str:
    return (
        f"content blocks of type {_type_of(value)!r} cannot be read: only text content is "
        f"supported by this server"
    )


def _unknown_block(value: Any) -> str:
    kind = _type_of(value)
    if kind is None:
        return "a content block needs a 'type'"
    return (
        f"content block type {kind!r} is not supported; expected one of "
        f"{', '.join(_MAPPED_BLOCK_TYPES)}"
    )


def _only_text(value: Any) -> str:
    kind = _type_of(value)
    if kind is None:
        return "a content block needs a 'type'"
    return f"expected a 'text' block here, not {kind!r}"


_Refused = _refusing(_not_text)
_Unknown = _refusing(_unknown_block)
_NotText = _refusing(_only_text)


def _tag(kind: str) -> str:
    # Spelled like pydantic's own union member names (``x[...]``), which the 400's field path
    # leaves out (``errors._path``): a bad tool id reads ``messages.1.content.0.id``.
    return f"block[{kind}]"


def _block_kind(value: Any) -> str | None:
    if not isinstance(value, dict | BaseModel):
        return None
    kind = _type_of(value)
    if kind in _MAPPED_BLOCK_TYPES:
        return _tag(kind)
    if kind in DROPPED_BLOCK_TYPES:
        return _tag("dropped")
    if kind in REFUSED_BLOCK_TYPES:
        return _tag("refused")
    return _tag("unknown")


def _result_part_kind(value: Any) -> str | None:
    if not isinstance(value, dict | BaseModel):
        return None
    kind = _type_of(value)
    if kind == "text":
        return _tag("text")
    if kind == "tool_reference":
        return _tag("dropped")
    if kind in REFUSED_BLOCK_TYPES:
        return _tag("refused")
    return _tag("not_text")


def _text_kind(value: Any) -> str | None:
    if not isinstance(value, dict | BaseModel):
        return None
    kind = _type_of(value)
    if kind == "text":
        return _tag("text")
    if kind in REFUSED_BLOCK_TYPES:
        return _tag("refused")
    return _tag("not_text")


_NOT_AN_OBJECT = {
    "custom_error_type": "invalid_content_block",
    "custom_error_message": "a content block must be an object",
}

ToolResultPart = Annotated[
    Annotated[TextBlock, Tag(_tag("text"))]
    | Annotated[DroppedBlock, Tag(_tag("dropped"))]
    | Annotated[_Refused, Tag(_tag("refused"))]
    | Annotated[_NotText, Tag(_tag("not_text"))],
    Discriminator(_result_part_kind, **_NOT_AN_OBJECT),
]

SystemPart = Annotated[
    Annotated[TextBlock, Tag(_tag("text"))]
    | Annotated[_Refused, Tag(_tag("refused"))]
    | Annotated[_NotText, Tag(_tag("not_text"))],
    Discriminator(_text_kind, **_NOT_AN_OBJECT),
]


def _as_blocks(value: Any) -> Any:
    """A string is one text block (Anthropic's shorthand); a list is checked block by block."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content blocks")
    return value


def joined_text(blocks: list[Any]) -> str:
    """The text blocks of ``blocks`` joined by newlines (other blocks leave nothing)."""
    return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))


class ToolResultBlock(_Model):
    """What the client's tool returned for ``tool_use_id`` (a user turn)."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: list[ToolResultPart] = Field(default_factory=list)
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        return [] if value is None else _as_blocks(value)

    @field_validator("is_error", mode="before")
    @classmethod
    def _is_error(cls, value: Any) -> Any:
        return False if value is None else value

    def text(self) -> str:
        return joined_text(self.content)


ContentBlock = Annotated[
    Annotated[TextBlock, Tag(_tag("text"))]
    | Annotated[ToolUseBlock, Tag(_tag("tool_use"))]
    | Annotated[ToolResultBlock, Tag(_tag("tool_result"))]
    | Annotated[ThinkingBlock, Tag(_tag("thinking"))]
    | Annotated[RedactedThinkingBlock, Tag(_tag("redacted_thinking"))]
    | Annotated[CompactionBlock, Tag(_tag("compaction"))]
    | Annotated[DroppedBlock, Tag(_tag("dropped"))]
    | Annotated[_Refused, Tag(_tag("refused"))]
    | Annotated[_Unknown, Tag(_tag("unknown"))],
    Discriminator(_block_kind, **_NOT_AN_OBJECT),
]


class Message(_Model):
    """One turn; ``content`` is normalized to a list of blocks."""

    role: Literal["user", "assistant", "system"]
    content: list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        return _as_blocks(value)


# -- tools -------------------------------------------------------------------------------------


class ClientTool(_Model):
    """A tool the client runs: offered to the model. ``cache_control``, ``strict``,
    ``input_examples``, ``eager_input_streaming`` are accepted and ignored."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    defer_loading: bool | None = None


class ServerTool(_Model):
    """A server or Anthropic-defined tool (any other ``type``): accepted, never offered."""

    type: str
    name: str | None = None


def _tool_kind(value: Any) -> str | None:
    if not isinstance(value, dict | BaseModel):
        return None
    kind = _type_of(value)
    if kind is None or kind == "custom" or not isinstance(kind, str):
        return "tool[custom]"  # a bad type is reported by ClientTool, at tools.N.type
    return "tool[server]"


Tool = Annotated[
    Annotated[ClientTool, Tag("tool[custom]")] | Annotated[ServerTool, Tag("tool[server]")],
    Discriminator(
        _tool_kind,
        custom_error_type="invalid_tool",
        custom_error_message="a tool must be an object",
    ),
]


class _ToolChoiceBase(_Model):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAuto(_ToolChoiceBase):
    """The model decides whether to call a tool."""

    type: Literal["auto"]


class ToolChoiceAny(_ToolChoiceBase):
    """The model calls one of the tools (Chat's ``required``)."""

    type: Literal["any"]


class ToolChoiceTool(_ToolChoiceBase):
    """The model calls the tool ``name``."""

    type: Literal["tool"]
    name: str = Field(min_length=1)


class ToolChoiceNone(_Model):
    """The model calls no tool."""

    type: Literal["none"]


_CHOICE_TYPES = ("auto", "any", "tool", "none")


def _choice_kind(value: Any) -> str | None:
    if not isinstance(value, dict | BaseModel):
        return None
    kind = _type_of(value)
    return f"choice[{kind}]" if kind in _CHOICE_TYPES else "choice[unknown]"


def _unknown_choice(value: Any) -> str:
    if _type_of(value) is None:
        return "needs a 'type': one of 'auto', 'any', 'tool', 'none'"
    return f"type must be one of {', '.join(map(repr, _CHOICE_TYPES))}, not {_type_of(value)!r}"


ToolChoice = Annotated[
    Annotated[ToolChoiceAuto, Tag("choice[auto]")]
    | Annotated[ToolChoiceAny, Tag("choice[any]")]
    | Annotated[ToolChoiceTool, Tag("choice[tool]")]
    | Annotated[ToolChoiceNone, Tag("choice[none]")]
    | Annotated[_refusing(_unknown_choice), Tag("choice[unknown]")],
    Discriminator(
        _choice_kind,
        custom_error_type="invalid_tool_choice",
        custom_error_message="must be an object with a 'type' (auto, any, tool or none)",
    ),
]


# -- everything else -------------------------------------------------------------------------


class ThinkingConfig(_Model):
    """Accepted for any ``type`` (enabled, disabled, adaptive, between_tools...); a local model
    thinks as its chat template says, and ``budget_tokens`` is not applied."""

    type: str
    budget_tokens: int | None = None
    display: str | None = None


class OutputFormat(_Model):
    """``output_config.format``: JSON matching ``schema`` (Anthropic's structured outputs)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    effort: str | None = None  # accepted, not applied
    format: OutputFormat | None = None


class MessagesRequest(_Model):
    """``POST /v1/messages``. ``system`` and each message's ``content`` are normalized to lists
    of blocks (a string is one text block)."""

    model: str = Field(min_length=1)
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: list[SystemPart] = Field(default_factory=list)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)  # Anthropic's range
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    context_management: Any = None
    container: Any = None
    mcp_servers: list[Any] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "must be at least 1 (max_tokens 0, which only warms Anthropic's prompt cache, "
                "is not supported by this server)"
            )
        return value

    @field_validator("system", mode="before")
    @classmethod
    def _system(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of text blocks")
        return value

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _stop_sequences(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a list of strings")
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        if any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters long")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _stream(cls, value: Any) -> Any:
        return False if value is None else value


def parse_messages_request(raw: bytes) -> MessagesRequest:
    """Parse and validate a Messages body. Raises ``BadRequest`` (400) naming the bad field:
    a bad shape or value, a block in the wrong role's turn, or a last turn of the assistant
    (prefill)."""
    req = parse_body(MessagesRequest, raw)
    _check_turns(req.messages)
    return req


# Which blocks a turn of each role may hold; thinking and dropped blocks go anywhere.
_WRONG_ROLE = {
    "user": {ToolUseBlock: "tool_use blocks belong in assistant messages"},
    "assistant": {ToolResultBlock: "tool_result blocks belong in user messages"},
    "system": {
        ToolUseBlock: "a system message holds text blocks only",
        ToolResultBlock: "a system message holds text blocks only",
        CompactionBlock: "a system message holds text blocks only",
    },
}


def _check_turns(messages: list[Message]) -> None:
    for i, message in enumerate(messages):
        wrong = _WRONG_ROLE[message.role]
        for j, block in enumerate(message.content):
            reason = wrong.get(type(block))
            if reason is not None:
                where = f"messages.{i}.content.{j}"
                raise BadRequest(f"Invalid request: {where}: {reason}.", param=where)
    if messages[-1].role == "assistant":
        where = f"messages.{len(messages) - 1}"
        raise BadRequest(
            f"Invalid request: {where}: the conversation ends with an assistant message, which "
            f"asks to continue that partial answer (prefill); this server does not support "
            f"prefill. End with a user message.",
            param=where,
        )
