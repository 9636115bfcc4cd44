"""Every dialect's shared path: prepare, run, answer.

A dialect (``api/dialects/``) parses its body into a ``NeutralRequest`` and supplies a
``Renderer``; from there this is the same for all: templating, tool planning and grammar
compilation in one worker thread (``prepare``, never on the Trio thread, which serves every
stream at once), the context clamp, admission, the run against the engine
(``streaming.session``), the stream (``streaming.stream``) or the whole body.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import Any

import trio
from quart import Response, request

from trioserve.api.dialects.neutral import NeutralRequest
from trioserve.api.errors import (
    ApiError,
    BadRequest,
    ContextLengthExceeded,
    RateLimited,
    ServiceUnavailable,
)
from trioserve.api.state import AppState, app_state
from trioserve.api.tooling import (
    ChatPlan,
    build_constraint_processor,
    plan_chat,
    shaping_for_prompt,
)
from trioserve.engine.events import Event
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import EngineNotReady, QueueFull
from trioserve.models.chat_template import (
    PromptError,
    chat_prompt_tokens,
    completion_prompt_tokens,
)
from trioserve.output.assembler import Assembler, Renderer
from trioserve.output.progress import wants_progress
from trioserve.output.shaper import ShapingSpec
from trioserve.streaming.session import Ending, run_generation
from trioserve.streaming.stream import SSEBody, StreamOptions

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class _Prepared:
    gen: GenerationRequest
    plan: ChatPlan | None
    shaping: ShapingSpec | None


async def handle_generation(
    parsed: NeutralRequest, renderer: Renderer, kind: str
) -> Response | tuple[dict, int]:
    """Answer one request of any dialect: a stream or a whole body from ``renderer``."""
    state = app_state()
    if state.drain.draining:
        raise ServiceUnavailable("The server is shutting down.")
    _admit(state)
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
    prepared = await trio.to_thread.run_sync(prepare, state, parsed, request_id)
    gen = prepared.gen
    log.info(
        "request %s: %s, %d prompt tokens, max_tokens %d, stream=%s",
        request_id,
        kind,
        len(gen.prompt_tokens),
        gen.max_tokens,
        parsed.stream,
    )
    _admit(state)  # again, for an early 429: the queue may have filled meanwhile
    assembler = Assembler(
        renderer,
        shaping=prepared.shaping,
        logprobs=parsed.logprobs,
        progress=parsed.stream and wants_progress(request.headers),
    )
    if parsed.stream:
        return _stream_response(state, gen, assembler)
    return await _complete(state, gen, assembler)


def prepare(state: AppState, parsed: NeutralRequest, request_id: str) -> _Prepared:
    """Everything costly before generation: runs in a worker thread (not the MLX one)."""
    tokenizer = state.engine.tokenizer
    plan = None
    if parsed.is_chat:  # tools, response_format, reasoning
        plan = plan_chat(parsed, tokenizer, state.chat_template)
    tokens = _prompt_tokens(state, parsed, plan)
    gen = parsed.generation_request(
        tuple(tokens),
        default_max_tokens=state.config.max_tokens,
        default_temperature=state.config.default_temperature,
        request_id=request_id,
    )
    # Prompt plus output never exceeds the context: the KV cache per slot stays bounded and
    # no request holds a slot without end. A larger max_tokens is clamped (the answer then
    # ends with finish_reason "length"), as llama.cpp and mlx-lm do, rather than refused.
    room = context_limit(state) - len(tokens)
    gen = replace(gen, max_tokens=min(gen.max_tokens, room))
    shaping = None
    if plan is not None:
        shaping = shaping_for_prompt(plan, tokenizer, tokens)
        # The grammar compiles here, once; the worker gets the ready matcher.
        gen = replace(gen, constraint=build_constraint_processor(plan, tokenizer))
    return _Prepared(gen, plan, shaping)


def context_limit(state: AppState) -> int:
    """Tokens of prompt plus output one request may use: the model's context, or less
    with ``--ctx-size``."""
    limit = state.context_length
    ctx_size = state.config.ctx_size
    return min(limit, ctx_size) if ctx_size else limit


def _prompt_tokens(state: AppState, parsed: NeutralRequest, plan: ChatPlan | None) -> list[int]:
    tokenizer = state.engine.tokenizer
    try:
        if parsed.is_chat and plan is not None:
            messages = parsed.template_messages()
            tokens = chat_prompt_tokens(tokenizer, messages, plan.tools, plan.template)
        else:
            tokens = completion_prompt_tokens(tokenizer, parsed.prompt)
    except PromptError as exc:
        raise BadRequest(str(exc), param=parsed.prompt_param) from None
    if not tokens:
        raise BadRequest("The prompt is empty.", param=parsed.prompt_param)
    # Ids past the embedding's rows would read out of bounds (MLX does not check).
    vocab = min(len(tokenizer), state.vocab_size or len(tokenizer))
    if any(t >= vocab for t in tokens):
        raise BadRequest(
            f"Token ids must be below the vocabulary size {vocab}.", param=parsed.prompt_param
        )
    limit = context_limit(state)
    if len(tokens) >= limit:
        param = parsed.prompt_param
        raise ContextLengthExceeded(
            f"This server's context length is {limit} tokens, but the prompt has "
            f"{len(tokens)} tokens (at least one more is needed for the answer).",
            param=param,
        )
    return tokens


def _admit(state: AppState) -> None:
    """An early 503 or 429 (with Retry-After) before any work; ``engine.admit`` is the bound."""
    try:
        state.engine.check_admission()
    except EngineNotReady as exc:
        raise ServiceUnavailable(
            str(exc) or "The model is still loading.", retry_after_s=2
        ) from None
    except QueueFull as exc:
        raise RateLimited(
            f"The server is busy: {exc}.", code="queue_full", retry_after_s=2
        ) from None


def _stream_response(state: AppState, gen: GenerationRequest, assembler: Assembler) -> Response:
    options = StreamOptions(
        heartbeat_interval_s=state.config.heartbeat_interval_s,
        keepalive_s=state.config.sse_keepalive_s,
        send_timeout_s=state.config.send_timeout_s,
        drain=state.drain,
        observer=state.metrics.observer(),
    )
    body = SSEBody(state.engine, gen, assembler, options)
    response = Response(body, status=200, headers=SSE_HEADERS)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT must never cut a stream
    return response


async def _complete(
    state: AppState, gen: GenerationRequest, assembler: Assembler
) -> tuple[dict[str, Any], int]:
    async def collect(event: Event) -> None:
        assembler.add(event)

    ending = await run_generation(
        state.engine,
        gen,
        collect,
        drain=state.drain,
        observer=state.metrics.observer(),
    )
    if ending.finished is None:
        raise _as_api_error(ending)
    log.debug(
        "request %s (%s) text: %r", gen.request_id, assembler.renderer.response_id, assembler.text
    )
    return assembler.body(ending.finished), 200


def _as_api_error(ending: Ending) -> ApiError:
    if ending.kind == "busy":
        return RateLimited(ending.message, code=ending.code, retry_after_s=ending.retry_after_s)
    if ending.kind == "unavailable":
        return ServiceUnavailable(
            ending.message, code=ending.code, retry_after_s=ending.retry_after_s
        )
    return ApiError(ending.message, code=ending.code)
