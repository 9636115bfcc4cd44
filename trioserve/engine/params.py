"""What a request asks the engine for: plain dataclasses, no HTTP, no MLX."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trioserve.engine.constraints import Constraint, GrammarProcessor


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    ``temperature == 0`` is greedy. ``seed`` gives the request its own random stream, so the
    same seed gives the same output whatever else shares the batch.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate.

    Args:
        prompt_tokens: the already templated and tokenized prompt.
        max_tokens: the cap on generated tokens (> 0).
        stop: stop strings; the matched text is left out of the output.
        sampling: sampling parameters.
        request_id: the id used in logs and responses.
        constraint: a grammar the output must follow (structured output, forced tool calls):
            best the ready ``GrammarProcessor`` for this one sequence, compiled off the MLX
            thread; a bare ``Constraint`` is compiled by the worker.
        continues_prompt: the output continues the prompt's text (raw completions), so a
            leading space of the first token is kept.
        prediction_tokens: a predicted output (OpenAI ``prediction``), tokenized: the source
            of draft tokens for speculative decoding, always used when given.
        speculation: this request's drafting without a prediction: "off",
            "prompt-lookup" or "draft-model"; None: the server's default (``--speculation``).
    """

    prompt_tokens: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    constraint: GrammarProcessor | Constraint | None = None
    continues_prompt: bool = False
    prediction_tokens: tuple[int, ...] | None = None
    speculation: str | None = None
