"""The two generation endpoints' shared path: validate, template, submit, answer.

Thin on purpose: parsing lives in ``schemas``, the stream in ``streaming.stream``, the
engine behind ``Engine.submit``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Literal

import trio
from quart import Response, request

from trioserve.api.errors import ApiError, BadRequest, ContextLengthExceeded, ServiceUnavailable
from trioserve.api.schemas import ChatCompletionRequest, CompletionRequest
from trioserve.api.state import AppState, app_state
from trioserve.engine.events import Failed, Finished, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.models.chat_template import (
    PromptError,
    chat_prompt_tokens,
    completion_prompt_tokens,
)
from trioserve.streaming.chunks import ChunkBuilder
from trioserve.streaming.progress import wants_progress
from trioserve.streaming.stream import StreamOptions, sse_frames

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def handle_generation(
    parsed: ChatCompletionRequest | CompletionRequest, kind: Literal["chat", "completion"]
) -> Response | tuple[dict, int]:
    state = app_state()
    if not state.engine.ready:
        raise ServiceUnavailable(state.load_error or "The model is still loading.", retry_after_s=2)
    tokens = _prompt_tokens(state, parsed)
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
    gen = parsed.generation_request(
        tuple(tokens),
        default_max_tokens=state.config.max_tokens,
        default_temperature=state.config.default_temperature,
        request_id=request_id,
    )
    builder = ChunkBuilder.new(kind, state.model_id)
    log.info(
        "request %s: %s, %d prompt tokens, max_tokens %d, stream=%s",
        request_id,
        kind,
        len(tokens),
        gen.max_tokens,
        parsed.stream,
    )
    if parsed.stream:
        return _stream_response(state, gen, builder, parsed)
    return await _complete(state, gen, builder, parsed, kind)


def _prompt_tokens(state: AppState, parsed: ChatCompletionRequest | CompletionRequest) -> list:
    tokenizer = state.engine.tokenizer
    try:
        if isinstance(parsed, ChatCompletionRequest):
            tokens = chat_prompt_tokens(tokenizer, parsed.template_messages(), parsed.tools)
        else:
            tokens = completion_prompt_tokens(tokenizer, parsed.prompt)
    except PromptError as exc:
        raise BadRequest(str(exc), param="messages") from None
    if not tokens:
        raise BadRequest("The prompt is empty.", param="prompt")
    vocab = len(tokenizer)
    if any(t >= vocab for t in tokens):
        raise BadRequest(f"Token ids must be below the vocabulary size {vocab}.", param="prompt")
    limit = state.context_length
    if len(tokens) >= limit:
        param = "messages" if isinstance(parsed, ChatCompletionRequest) else "prompt"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{len(tokens)} tokens.",
            param=param,
        )
    return tokens


def _stream_response(
    state: AppState,
    gen: GenerationRequest,
    builder: ChunkBuilder,
    parsed: ChatCompletionRequest | CompletionRequest,
) -> Response:
    options = StreamOptions(
        progress=wants_progress(request.headers),
        include_usage=parsed.include_usage,
        logprobs=parsed.want_logprobs,
        heartbeat_interval_s=state.config.heartbeat_interval_s,
        keepalive_s=state.config.sse_keepalive_s,
    )
    engine = state.engine

    async def body():
        async with sse_frames(engine, gen, builder, options) as frames:
            async for frame in frames:
                yield frame

    response = Response(body(), status=200, headers=SSE_HEADERS)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT must never cut a stream
    return response


async def _complete(
    state: AppState,
    gen: GenerationRequest,
    builder: ChunkBuilder,
    parsed: ChatCompletionRequest | CompletionRequest,
    kind: Literal["chat", "completion"],
) -> tuple[dict, int]:
    deltas: list[TokenDelta] = []
    finished: Finished | None = None
    async with state.engine.submit(gen) as handle:
        try:
            async for event in handle.events():
                if isinstance(event, TokenDelta):
                    deltas.append(event)
                elif isinstance(event, Finished):
                    finished = event
                elif isinstance(event, Failed):
                    raise ApiError(event.message, code="generation_failed")
        except trio.Cancelled:
            log.info(
                "request %s aborted by the client while %s, after %d generated token(s)",
                gen.request_id,
                handle.phase,
                handle.completion_tokens,
            )
            raise
    assert finished is not None  # events() ends only after Finished or Failed
    text = "".join(d.text for d in deltas)
    log.info(
        "request %s done: %d prompt + %d generated tokens, finish=%s",
        gen.request_id,
        finished.usage.prompt_tokens,
        finished.usage.completion_tokens,
        finished.reason,
    )
    make = builder.chat_response if kind == "chat" else builder.completion_response
    body = make(text, finished.reason, finished.usage, deltas, parsed.want_logprobs)
    return body, 200
