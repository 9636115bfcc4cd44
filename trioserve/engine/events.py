"""Events the engine sends to a request's consumer, in this order:

``PrefillProgress``* → ``TokenDelta``* → exactly one of ``Finished`` or ``Failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PrefillProgress:
    """A chunk of the prompt went through the model: ``processed`` of ``total`` tokens."""

    processed: int
    total: int


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenDelta:
    """One generated token and the text it adds (may be "" while bytes are incomplete).

    ``logprob``/``top_logprobs`` are filled only when the request asked for logprobs, and so
    are ``token_text``/``token_bytes``: the chosen token on its own (``text`` can be "" or
    hold several tokens' worth while the detokenizer waits for complete characters).
    """

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    token_text: str | None = None
    token_bytes: tuple[int, ...] | None = None


FinishReason = Literal["stop", "length"]  # "tool_calls" is decided above the engine


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # A request with a predicted output: its draft tokens the model accepted / rejected
    # (None: no prediction, and the usage says nothing about them).
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    """Generation ended normally."""

    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass(frozen=True)
class Failed:
    """The engine could not finish this request. ``message`` is shown to the client: it names
    the kind of failure (an exception's type, a grammar violation's own message), never an
    arbitrary exception's text."""

    message: str


Event = PrefillProgress | TokenDelta | Finished | Failed
