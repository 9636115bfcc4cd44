"""Request models for the OpenAI endpoints: validate at the edge, convert once.

pydantic checks a body against OpenAI's shape and its ranges; the ``sampling_params`` /
``generation_request`` methods hand the engine plain dataclasses, so nothing below the API sees a
request dict. Unknown fields are ignored (clients send many we do not use, and most only tune
what OpenAI's own service does). OpenAI fields that would change the answer and that we do not
implement are a 400 naming the field, never silently dropped: n > 1, several prompts, non-text
content, a non-empty ``logit_bias``, and for completions ``echo: true``, a non-empty ``suffix``
and ``best_of`` other than 1. Their neutral values (``logit_bias: {}``, ``echo: false``...) are
accepted, since SDKs send them as defaults.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trioserve.api.errors import BadRequest, from_validation_error

__all__ = [
    "MAX_SEED",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "SamplingRequest",
    "StreamOptions",
    "check_stop",
    "parse_body",
    "parse_chat_request",
    "parse_completion_request",
]

MAX_STOP_STRINGS = 4
# Longest stop string, in characters. The stop filter runs on the MLX thread for every token
# of every sequence in the batch, and while text could still be the start of a stop string it
# tries each held tail against each stop: worst case O(len(stop)^2) per token. Measured on a
# 2-core CPU with four stops: 0.23 ms for a token at 256 characters, 11 ms at 4096, 245 ms at
# 65536 (a decode step is ~130 ms), so an unbounded stop string could stall the whole batch.
# Real stop strings ("\n\nUser:", "</answer>", a code fence) are far shorter. The filter also
# holds back up to this many characters of a stream, another reason to keep it small.
MAX_STOP_CHARS = 256
# ``mx.random.key`` takes a uint64: 0..2**64-1. Anything else would fail on the worker.
MAX_SEED = 2**64 - 1


def check_stop(value: Any) -> Any:
    """A ``stop`` value as sent (None, a string or a list of strings), or ``ValueError``: at
    most ``MAX_STOP_STRINGS``, none empty, none longer than ``MAX_STOP_CHARS``. For a
    ``mode="before"`` field validator; shared by every dialect that takes ``stop``."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
    if any(s == "" for s in items):
        raise ValueError("stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    """A text content part; the only kind this text-only server accepts."""

    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Checked here so a bad part gets one clear message, not one error per union member.
        if not isinstance(value, list):
            return value
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object")
            kind = part.get("type")
            if kind != "text":
                raise ValueError(
                    f"content part {i} has type {kind!r}: only text content is supported"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined by newlines; no content is ""."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        """The plain dict a chat template expects; ``developer`` becomes ``system``."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Model):
    include_usage: bool = False


class Prediction(_Model):
    """OpenAI Predicted Outputs: text the answer is expected to repeat much of (an edited
    file). It becomes the draft of speculative decoding; the answer stays the model's own."""

    type: Literal["content"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# Not OpenAI's: this server's per-request choice of drafting without a prediction.
SpeculationMode = Literal["off", "prompt-lookup", "draft-model"]


class SamplingRequest(_Model):
    """Fields shared by chat and text completions, and their conversion for the engine."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # only empty: not implemented

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("not supported by this server (only an empty map is accepted)")
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        return check_stop(value)

    # Overridden per endpoint: how logprobs are asked for differs.
    @property
    def want_logprobs(self) -> bool:
        return False

    @property
    def top_logprobs_count(self) -> int:
        return 0

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``. ``tools``/``tool_choice``/``response_format`` are
    accepted and passed on as given; the server decides what it honours."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    prediction: Prediction | None = None
    speculation: SpeculationMode | None = None

    @property
    def want_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def top_logprobs_count(self) -> int:
        # top_logprobs without logprobs=true is ignored, not an error.
        return (self.top_logprobs or 0) if self.want_logprobs else 0

    def requested_max_tokens(self) -> int | None:
        # The newer name wins over the deprecated one.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``.

    ``prompt`` is normalized to one string or one list of token ids. ``echo``, ``suffix`` and
    ``best_of`` are not implemented: only their neutral values are accepted.
    """

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    prediction: Prediction | None = None  # not OpenAI's here; as in Chat
    speculation: SpeculationMode | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo=true is not supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("not supported by this server (only an empty suffix is accepted)")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("must be a string, a list of token ids, or a list of one of those")
        if _is_token_list(value):
            return value
        if len(value) > 1:
            raise ValueError("only one prompt is supported")
        only = value[0]
        if isinstance(only, str) or (isinstance(only, list) and only and _is_token_list(only)):
            return only
        raise ValueError("must be a string, a list of token ids, or a list of one of those")

    @property
    def want_logprobs(self) -> bool:
        # logprobs=0 still asks for the chosen tokens' logprobs.
        return self.logprobs is not None

    @property
    def top_logprobs_count(self) -> int:
        return self.logprobs or 0


def _is_token_list(items: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON_KINDS: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

_M = TypeVar("_M", bound=BaseModel)


def parse_body(model: type[_M], raw: bytes) -> _M:
    """A JSON object body validated against ``model``. Raises ``BadRequest`` (400) for an
    empty body, invalid JSON, a body that is not an object, or a bad field (``param`` names
    it); shared by every dialect."""
    if not raw.strip():
        raise BadRequest("Request body is empty: expected a JSON object.")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise BadRequest(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        kind = _JSON_KINDS.get(type(body), type(body).__name__)
        raise BadRequest(f"Request body must be a JSON object, not {kind}.")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise from_validation_error(exc) from None


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat body. Raises ``BadRequest`` (400) naming the bad field."""
    return parse_body(ChatCompletionRequest, raw)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Parse and validate a completions body. Raises ``BadRequest`` (400) naming the bad field."""
    return parse_body(CompletionRequest, raw)
