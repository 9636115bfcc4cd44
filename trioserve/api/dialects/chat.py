"""The Chat Completions and Completions dialects: their requests, mapping and renderers.

Requests are validated by ``api.schemas`` (``ChatCompletionRequest``, ``CompletionRequest``)
and mapped here to the ``NeutralRequest``; the renderers turn neutral pieces into
``chat.completion.chunk`` / ``text_completion`` payloads through ``output.chunks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trioserve.api.dialects.neutral import NeutralRequest
from trioserve.api.schemas import ChatCompletionRequest, CompletionRequest
from trioserve.engine.events import TokenDelta, Usage
from trioserve.output import sse
from trioserve.output.chunks import ChunkBuilder, error_payload
from trioserve.output.pieces import ContentPiece, Piece
from trioserve.output.progress import PROGRESS_EVENT
from trioserve.output.shaper import ShapedMessage


def chat_to_neutral(parsed: ChatCompletionRequest) -> NeutralRequest:
    return NeutralRequest(
        messages=tuple(parsed.template_messages()),
        tools=parsed.tools,
        tool_choice=parsed.tool_choice,
        response_format=parsed.response_format,
        parallel_tool_calls=parsed.parallel_tool_calls is not False,
        prediction=parsed.prediction.text() if parsed.prediction is not None else None,
        speculation=parsed.speculation,
        **_sampling(parsed),
        prompt_param="messages",
    )


def completion_to_neutral(parsed: CompletionRequest) -> NeutralRequest:
    prompt = parsed.prompt if isinstance(parsed.prompt, str) else tuple(parsed.prompt)
    return NeutralRequest(
        prompt=prompt,
        prediction=parsed.prediction.text() if parsed.prediction is not None else None,
        speculation=parsed.speculation,
        **_sampling(parsed),
        prompt_param="prompt",
    )


def _sampling(parsed: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    return {
        "max_tokens": parsed.requested_max_tokens(),
        "temperature": parsed.temperature,
        "top_p": parsed.top_p,
        "seed": parsed.seed,
        "stop": parsed.stop_strings(),
        "presence_penalty": parsed.presence_penalty or 0.0,
        "frequency_penalty": parsed.frequency_penalty or 0.0,
        "logprobs": parsed.want_logprobs,
        "top_logprobs": parsed.top_logprobs_count,
        "stream": parsed.stream,
        "include_usage": parsed.include_usage,
    }


class ChunkRenderer:
    """Chat Completions (``kind="chat"``) or Completions (``"completion"``) output."""

    opening_needs_prompt = False

    def __init__(self, builder: ChunkBuilder, *, logprobs: bool, include_usage: bool) -> None:
        self.builder = builder
        self.logprobs = logprobs
        self.include_usage = include_usage

    @property
    def response_id(self) -> str:
        return self.builder.id

    def opening(self, prompt_tokens: int) -> list[bytes]:
        return []

    def progress(self, fields: dict[str, Any]) -> bytes:
        # A valid chunk (``choices: []``): strict clients read every data line as a chunk.
        return sse.event(PROGRESS_EVENT, self.builder.progress_chunk(**fields))

    def keepalive(self) -> bytes | None:
        return None  # strict clients of this dialect take no keepalive events

    def content_start(self) -> list[bytes]:
        return [sse.data(self.builder.role_chunk())]

    def pieces(self, pieces: Sequence[Piece], deltas: Sequence[TokenDelta]) -> list[bytes]:
        logprobs = self.logprobs and bool(deltas)
        if self.builder.kind == "completion":
            text = "".join(p.text for p in pieces if isinstance(p, ContentPiece))
            return [sse.data(self.builder.content_chunk(text, deltas, logprobs))]
        return [sse.data(c) for c in self.builder.piece_chunks(pieces, deltas, logprobs)]

    def finish(self, reason: str, usage: Usage, stop_sequence: str | None = None) -> list[bytes]:
        out = [sse.data(self.builder.finish_chunk(reason))]
        if self.include_usage:
            out.append(sse.data(self.builder.usage_chunk(usage)))
        return [*out, sse.DONE]

    def error(self, message: str, code: str, error_type: str) -> list[bytes]:
        return [sse.data(error_payload(message, error_type, code=code)), sse.DONE]

    def whole(
        self,
        pieces: Sequence[Piece],
        deltas: Sequence[TokenDelta],
        reason: str,
        usage: Usage,
        stop_sequence: str | None = None,
    ) -> dict[str, Any]:
        message = ShapedMessage()
        message.add(list(pieces))
        if self.builder.kind == "completion":
            return self.builder.completion_response(
                message.content, reason, usage, deltas, self.logprobs
            )
        return self.builder.chat_response(
            message.content,
            reason,
            usage,
            deltas,
            self.logprobs,
            tool_calls=message.tool_calls or None,
            reasoning=message.reasoning or None,
        )
