"""The two generation endpoints' shared path: validate, template, submit, answer.

Thin on purpose: parsing lives in ``schemas``, the stream in ``streaming.stream``, the
engine behind ``Engine.submit``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Literal

import trio
from quart import Response, request

from trioserve.api.errors import (
    ApiError,
    BadRequest,
    ContextLengthExceeded,
    RateLimited,
    ServiceUnavailable,
)
from trioserve.api.schemas import ChatCompletionRequest, CompletionRequest
from trioserve.api.state import AppState, app_state
from trioserve.api.tooling import ChatPlan, check_plan, plan_chat, shaping_for_prompt
from trioserve.engine.events import Failed, Finished, TokenDelta
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import QueueFull, QueueTimeout
from trioserve.models.chat_template import (
    PromptError,
    chat_prompt_tokens,
    completion_prompt_tokens,
)
from trioserve.streaming.chunks import ChunkBuilder
from trioserve.streaming.progress import wants_progress
from trioserve.streaming.shaper import ShapingSpec, shape_text
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
    if state.drain.draining:
        raise ServiceUnavailable("The server is shutting down.")
    _admit(state)
    plan = None
    if isinstance(parsed, ChatCompletionRequest):  # tools, response_format, reasoning
        plan = plan_chat(parsed, state.engine.tokenizer, state.chat_template)
    tokens = _prompt_tokens(state, parsed, plan)
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
    _register_test_fault(state, request_id)
    gen = parsed.generation_request(
        tuple(tokens),
        default_max_tokens=state.config.max_tokens,
        default_temperature=state.config.default_temperature,
        request_id=request_id,
    )
    shaping = None
    if plan is not None:
        await check_plan(plan, state.engine.tokenizer)
        gen = replace(gen, constraint=plan.constraint)
        shaping = shaping_for_prompt(plan, state.engine.tokenizer, tokens)
    builder = ChunkBuilder.new(kind, state.model_id)
    log.info(
        "request %s: %s, %d prompt tokens, max_tokens %d, stream=%s",
        request_id,
        kind,
        len(tokens),
        gen.max_tokens,
        parsed.stream,
    )
    _admit(state)  # again: the queue may have filled while the prompt was prepared
    if parsed.stream:
        return _stream_response(state, gen, builder, parsed, shaping)
    return await _complete(state, gen, builder, parsed, kind, shaping)


def _register_test_fault(state: AppState, request_id: str) -> None:
    """Tests only (TRIOSERVE_TEST_FAULTS=1): make the model fail this request on purpose."""
    phase = request.headers.get("X-Trioserve-Test-Fault")
    faults = state.extras.get("test_faults")
    if phase and faults is not None:
        faults[request_id] = phase


def _prompt_tokens(
    state: AppState, parsed: ChatCompletionRequest | CompletionRequest, plan: ChatPlan | None
) -> list:
    tokenizer = state.engine.tokenizer
    try:
        if isinstance(parsed, ChatCompletionRequest) and plan is not None:
            messages = parsed.template_messages()
            tokens = chat_prompt_tokens(tokenizer, messages, plan.tools, plan.template)
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


def _admit(state: AppState) -> None:
    """429 (with Retry-After) when the request would wait behind ``--max-queue`` others."""
    try:
        state.engine.check_admission()
    except QueueFull as exc:
        raise RateLimited(
            f"The server is busy: {exc}.", code="queue_full", retry_after_s=2
        ) from None


def _stream_response(
    state: AppState,
    gen: GenerationRequest,
    builder: ChunkBuilder,
    parsed: ChatCompletionRequest | CompletionRequest,
    shaping: ShapingSpec | None = None,
) -> Response:
    options = StreamOptions(
        shaping=shaping,
        progress=wants_progress(request.headers),
        include_usage=parsed.include_usage,
        logprobs=parsed.want_logprobs,
        heartbeat_interval_s=state.config.heartbeat_interval_s,
        keepalive_s=state.config.sse_keepalive_s,
        send_timeout_s=state.config.send_timeout_s,
        drain=state.drain,
        observer=state.metrics.observer(),
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
    shaping: ShapingSpec | None = None,
) -> tuple[dict, int]:
    deltas: list[TokenDelta] = []
    finished: Finished | None = None
    observer = state.metrics.observer()
    async with state.engine.submit(gen) as handle:
        try:
            with state.drain.guard() as generation:
                async for event in handle.events():
                    observer.on_event(event, handle)
                    if isinstance(event, TokenDelta):
                        deltas.append(event)
                    elif isinstance(event, Finished):
                        finished = event
                    elif isinstance(event, Failed):
                        raise ApiError(event.message, code="generation_failed")
        except QueueTimeout as exc:
            raise RateLimited(str(exc), code="queue_timeout", retry_after_s=5) from None
        except trio.Cancelled:
            log.info(
                "request %s aborted by the client while %s, after %d generated token(s)",
                gen.request_id,
                handle.phase,
                handle.completion_tokens,
            )
            observer.disconnected(handle.phase)
            raise
    if finished is None and generation.cancelled_caught:
        raise ServiceUnavailable("The server is shutting down.", code="server_shutdown")
    assert finished is not None  # events() ends only after Finished or Failed
    text = "".join(d.text for d in deltas)
    log.info(
        "request %s done: %d prompt + %d generated tokens, finish=%s",
        gen.request_id,
        finished.usage.prompt_tokens,
        finished.usage.completion_tokens,
        finished.reason,
    )
    log.debug("request %s (%s) text: %r", gen.request_id, builder.id, text)
    if shaping is not None:  # split into content, reasoning and tool calls
        message, reason = shape_text(shaping, text, finished.reason)
        body = builder.chat_response(
            message.content,
            reason,
            finished.usage,
            deltas,
            parsed.want_logprobs,
            tool_calls=message.tool_calls,
            reasoning=message.reasoning,
        )
        return body, 200
    make = builder.chat_response if kind == "chat" else builder.completion_response
    body = make(text, finished.reason, finished.usage, deltas, parsed.want_logprobs)
    return body, 200
