"""The neutral request every wire dialect maps into, and what the shared pipeline reads.

A dialect (Chat Completions, Completions, Responses, ...) parses its own body and builds one
``NeutralRequest``; from there templating, tool planning, constraints, admission, the stream
and cancellation are shared. Field shapes follow Chat Completions, the lingua franca the chat
templates and tool planner already speak: ``messages`` are template dicts (``role``,
``content``, ``tool_calls``, ``tool_call_id``, ``name``), ``tools`` are
``{"type": "function", "function": {...}}``, ``response_format`` is Chat's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trioserve.engine.params import GenerationRequest, SamplingParams


@dataclass(frozen=True)
class NeutralRequest:
    """One generation request, whatever wire format it came in.

    Exactly one of ``messages`` (a chat, rendered by the chat template) and ``prompt`` (raw
    text or token ids, continued as is) is set.
    """

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # False: a forced tool_choice ("required") yields exactly one call, not one or more.
    parallel_tool_calls: bool = True
    max_tokens: int | None = None  # None: the server's default cap
    temperature: float | None = None  # None: the server's default
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False  # Chat's stream_options.include_usage
    prediction: str | None = None  # Predicted Outputs: the draft for speculative decoding
    # "off" | "prompt-lookup" | "draft-model"; None: the server's default
    speculation: str | None = None
    # Where a problem is reported: the dialect's own field names.
    prompt_param: str = "messages"
    format_param: str = "response_format"

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def template_messages(self) -> list[dict[str, Any]]:
        return list(self.messages or ())

    def sampling_params(self, default_temperature: float = 1.0) -> SamplingParams:
        return SamplingParams(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )

    def generation_request(
        self,
        prompt_tokens: tuple[int, ...],
        *,
        default_max_tokens: int,
        default_temperature: float = 1.0,
        request_id: str = "",
    ) -> GenerationRequest:
        """Everything the engine needs, once the prompt is templated and tokenized."""
        return GenerationRequest(
            prompt_tokens=tuple(prompt_tokens),
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            stop=self.stop,
            sampling=self.sampling_params(default_temperature),
            request_id=request_id,
            continues_prompt=not self.is_chat,
            speculation=self.speculation,
        )
