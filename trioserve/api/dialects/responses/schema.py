"""The request body of ``POST /v1/responses`` (OpenAI's Responses API), validated at the edge.

Follows OpenAI's reference (the openai SDK's ``ResponseCreateParams``): unknown fields are
ignored, and every problem is a 400 whose ``param`` names the field (``input.2.call_id``).

``input`` is a string (one user message) or a list of items:

- ``message`` (roles ``user``, ``assistant``, ``system``, ``developer``; an item with a ``role``
  and no ``type`` is a message too), content a string or text parts (``input_text``,
  ``output_text``, ``refusal``); ``input_image`` / ``input_file`` parts are a 400: this server
  reads text only;
- ``function_call`` / ``function_call_output`` and ``custom_tool_call`` /
  ``custom_tool_call_output``: a tool round trip, replayed by the client;
- ``reasoning``: accepted and dropped, whatever it holds (Codex replays it with
  ``encrypted_content``);
- the other item types OpenAI defines (``item_reference``, ``compaction``, the calls of hosted
  tools such as ``web_search_call``, ``mcp_call``, ``local_shell_call``...): history of tools
  this server does not run; accepted and dropped;
- any other type: a 400 naming the item.

Fields that would change the answer and that are not implemented are a 400 naming the field:
``background: true``, ``conversation``, ``prompt`` (templates).
"""

from __future__ import annotations

import json
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

from trioserve.api.schemas import (
    MAX_SEED,
    Prediction,
    SpeculationMode,
    check_stop,
    parse_body,
)

__all__ = [
    "CustomToolCallItem",
    "CustomToolCallOutputItem",
    "DroppedItem",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "InputItem",
    "MessageItem",
    "ReasoningConfig",
    "ReasoningItem",
    "ResponsesRequest",
    "TextConfig",
    "TextFormat",
    "TextPart",
    "parse_responses_request",
]

# Item types of OpenAI's Responses API that describe what hosted or server-side tools did
# (or refer to stored items): accepted in ``input`` and dropped, since this server runs none
# of those tools. From the openai SDK's ``ResponseInputItemParam`` (3.57).
DROPPED_ITEM_TYPES = frozenset(
    {
        "item_reference",
        "compaction",
        "compaction_summary",
        "compaction_trigger",
        "configuration_update",
        "additional_tools",
        "file_search_call",
        "web_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "tool_search_call",
        "tool_search_output",
        "program",
        "program_output",
        "ghost_snapshot",  # Codex's own bookkeeping item, should one ever reach the wire
    }
)

_MAPPED_ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "reasoning",
)
_TEXT_PARTS = ("input_text", "output_text", "text")
_NON_TEXT_PARTS = ("input_image", "input_file", "input_audio")

MAX_METADATA_PAIRS = 16  # OpenAI's limits for ``metadata``
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    """A text content part; ``refusal`` parts arrive here with their text in ``text``."""

    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str


def _text_parts(value: Any, what: str) -> Any:
    """Content as text parts only, each problem named by its index (one clear message, not
    one error per union member). ``refusal`` parts are normalized to ``text``."""
    if not isinstance(value, list):
        return value
    parts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise ValueError(f"{what} part {i} must be an object")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{what} part {i} ({kind}) needs a string 'text'")
            parts.append(part)
        elif kind == "refusal":
            if not isinstance(part.get("refusal"), str):
                raise ValueError(f"{what} part {i} (refusal) needs a string 'refusal'")
            parts.append({"type": "refusal", "text": part["refusal"]})
        elif kind in _NON_TEXT_PARTS:
            raise ValueError(
                f"{what} part {i} has type {kind!r}: only text input is supported by this "
                f"server (use 'input_text')"
            )
        else:
            raise ValueError(
                f"{what} part {i} has type {kind!r}: expected 'input_text' or 'output_text'"
            )
    return parts


def _join(content: str | list[TextPart]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_parts(value, "content")

    def text(self) -> str:
        """The content as one string: text parts joined by newlines."""
        return _join(self.content)


def _arguments_as_text(value: Any) -> Any:
    # OpenAI sends (and expects) a JSON string; a client that sends the object is understood.
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return value


class FunctionCallItem(_Model):
    """A call the model made earlier, replayed by the client."""

    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str
    namespace: str | None = None  # set when the function came from a ``namespace`` tool
    id: str | None = None

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, value: Any) -> Any:
        return _arguments_as_text(value)


class FunctionCallOutputItem(_Model):
    """What the client's function returned for ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str | None = None  # optional in OpenAI's current schema
    output: str | list[TextPart]

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_parts(value, "output")

    def text(self) -> str:
        return _join(self.output)


class CustomToolCallItem(_Model):
    """A call of a freeform (``custom``) tool: its raw text input, not JSON arguments."""

    type: Literal["custom_tool_call"]
    call_id: str
    name: str = Field(min_length=1)
    input: str
    namespace: str | None = None


class CustomToolCallOutputItem(_Model):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: str | list[TextPart]

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_parts(value, "output")

    def text(self) -> str:
        return _join(self.output)


class ReasoningItem(_Model):
    """Reasoning a client replays (summaries, ``encrypted_content``): accepted, never read."""

    type: Literal["reasoning"]


class DroppedItem(_Model):
    """An item of one of ``DROPPED_ITEM_TYPES``: accepted and dropped, fields unchecked."""

    type: str = "item_reference"  # the one such item whose type may be left out


class _UnknownItem(_Model):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind is None:
            raise ValueError("an input item needs a 'type' (or a 'role', for a message)")
        raise ValueError(
            f"input item type {kind!r} is not supported; expected one of "
            f"{', '.join(_MAPPED_ITEM_TYPES)}"
        )


def _item_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # already validated (model_construct, tests)
        value = {"type": getattr(value, "type", None)}
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind is None:
        if "role" in value:
            kind = "message"
        elif "id" in value:  # OpenAI's ``item_reference`` may omit its type
            kind = "item_reference"
    if kind in _MAPPED_ITEM_TYPES:
        return _tag(kind)
    if kind in DROPPED_ITEM_TYPES:
        return _tag("dropped")
    return _tag("unknown")


def _tag(kind: str) -> str:
    # Spelled like pydantic's own union member names (``x[...]``), which the 400's field path
    # leaves out (``errors._path``): a bad call id reads ``input.2.call_id``, not
    # ``input.2.function_call.call_id``.
    return f"item[{kind}]"


InputItem = Annotated[
    Annotated[MessageItem, Tag(_tag("message"))]
    | Annotated[FunctionCallItem, Tag(_tag("function_call"))]
    | Annotated[FunctionCallOutputItem, Tag(_tag("function_call_output"))]
    | Annotated[CustomToolCallItem, Tag(_tag("custom_tool_call"))]
    | Annotated[CustomToolCallOutputItem, Tag(_tag("custom_tool_call_output"))]
    | Annotated[ReasoningItem, Tag(_tag("reasoning"))]
    | Annotated[DroppedItem, Tag(_tag("dropped"))]
    | Annotated[_UnknownItem, Tag(_tag("unknown"))],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_input_item",
        custom_error_message="an input item must be an object",
    ),
]


class TextFormat(_Model):
    """``text.format``: plain text, any JSON object, or JSON matching ``schema``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' format needs a 'schema' object")
        return self


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Model):
    """Accepted; a local model thinks as its chat template says (``effort`` is not applied)."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the older name of ``summary``


class ResponsesRequest(_Model):
    """``POST /v1/responses``. ``tools`` are kept as sent (any type; the mapping offers the
    function tools); ``input`` is normalized to a list of items (a string is one user
    message)."""

    model: str | None = None
    input: list[InputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # not OpenAI's; as in Chat
    stop: str | list[str] | None = None  # not OpenAI's; as in Chat
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    prediction: Prediction | None = None  # not OpenAI's here; as in Chat
    speculation: SpeculationMode | None = None  # not OpenAI's; as in Chat
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    background: bool | None = None
    conversation: Any = None  # only absent or null: not implemented
    prompt: Any = None  # only absent or null: not implemented

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of input items")
        return value

    @field_validator("store", mode="before")
    @classmethod
    def _store_default(cls, value: Any) -> Any:
        return True if value is None else value  # null: OpenAI's default, true

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        return check_stop(value)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in ("none", "auto", "required"):
                raise ValueError(
                    f"must be 'none', 'auto', 'required' or a tool object, not {value!r}"
                )
            return value
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ValueError("must be 'none', 'auto', 'required' or an object with a 'type'")
        kind = value["type"]
        if kind == "function" and not (isinstance(value.get("name"), str) and value["name"]):
            raise ValueError("{'type': 'function'} needs a non-empty string 'name'")
        if kind == "allowed_tools":
            if value.get("mode") not in ("auto", "required"):
                raise ValueError("allowed_tools needs 'mode' 'auto' or 'required'")
            tools = value.get("tools")
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise ValueError("allowed_tools needs 'tools', a list of tool objects")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys must be at most {MAX_METADATA_KEY_CHARS} characters")
            if len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"values must be at most {MAX_METADATA_VALUE_CHARS} characters ({key!r})"
                )
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value

    @field_validator("conversation")
    @classmethod
    def _no_conversation(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "conversations are not supported by this server; use previous_response_id"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _no_prompt(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("prompt templates are not supported by this server")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def want_logprobs(self) -> bool:
        """Whether the client asked for the output text's logprobs (``include``)."""
        return "message.output_text.logprobs" in (self.include or ())


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    """Parse and validate a Responses body. Raises ``BadRequest`` (400) naming the bad field."""
    return parse_body(ResponsesRequest, raw)
