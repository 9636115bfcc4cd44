"""Every dialect's shared path: prepare, run, answer.

A dialect (``api/dialects/``) parses its body into a ``NeutralRequest`` and supplies a
``Renderer``; from there this is the same for all: templating, tool planning and grammar
compilation in one worker thread (``prepare``, never on the Trio thread, which serves every
stream at once), the context clamp, admission, the run against the engine
(``streaming.session``), the stream (``streaming.stream``) or the whole body. The model is
the one the request named (``api.models.pick``), leased for the whole generation. A streamed
request whose model is still loading (several models) gets its headers at once and waits for
the lease inside the stream (``streaming.stream.Pending``), its errors then in-stream.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
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
from trioserve.api.models import acquire, wait_for_lease
from trioserve.api.state import AppState, app_state
from trioserve.api.tooling import (
    ChatPlan,
    build_constraint_processor,
    plan_chat,
    shaping_for_prompt,
)
from trioserve.engine.events import Event
from trioserve.engine.params import GenerationRequest
from trioserve.engine.pool import Lease, ModelState, ServedModel
from trioserve.engine.scheduler import Engine, EngineNotReady, QueueFull
from trioserve.models.chat_template import (
    PromptError,
    chat_prompt_tokens,
    completion_prompt_tokens,
)
from trioserve.output.assembler import Assembler, Renderer
from trioserve.output.progress import wants_progress
from trioserve.output.shaper import ShapingSpec
from trioserve.streaming.session import Ending, run_generation
from trioserve.streaming.stream import Generation, Pending, SSEBody, StartFailed, StreamOptions

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
    parsed: NeutralRequest, renderer: Renderer, kind: str, served: ServedModel
) -> Response | tuple[dict, int]:
    """Answer one request of any dialect on ``served``: a stream or a whole body from
    ``renderer``. Waits while that model loads; holds its lease until generation ends. A
    stream whose model is not loaded yet answers at once and waits inside the stream."""
    state = app_state()
    if state.drain.draining:
        raise ServiceUnavailable("The server is shutting down.")
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
    progress = parsed.stream and wants_progress(request.headers)
    if parsed.stream and state.models.several and served.state in _NOT_LOADED:
        return _pending_stream(state, served, parsed, renderer, kind, request_id, progress)
    lease = await acquire(state, served)
    streaming = False
    try:
        engine, prepared = await _prepare_on(state, served, parsed, kind, request_id)
        assembler = Assembler(
            renderer, shaping=prepared.shaping, logprobs=parsed.logprobs, progress=progress
        )
        if parsed.stream:
            generation = Generation(engine, prepared.gen)
            response = _stream_response(state, generation, assembler, lease.release)
            streaming = True  # the body returns the lease when it ends
            return response
        return await _complete(state, engine, prepared.gen, assembler)
    finally:
        if not streaming:
            lease.release()


# A model in these states makes a stream wait for its load; a failed one answers at once.
_NOT_LOADED = (ModelState.UNLOADED, ModelState.LOADING)


async def _prepare_on(
    state: AppState, served: ServedModel, parsed: NeutralRequest, kind: str, request_id: str
) -> tuple[Engine, _Prepared]:
    """Admission checks and ``prepare`` on a leased ``served``; raises ``ApiError``."""
    engine = _engine(served)
    _admit(engine)
    prepared = await trio.to_thread.run_sync(prepare, state, served, parsed, request_id)
    log.info(
        "request %s: %s on %s, %d prompt tokens, max_tokens %d, stream=%s",
        request_id,
        kind,
        served.name,
        len(prepared.gen.prompt_tokens),
        prepared.gen.max_tokens,
        parsed.stream,
    )
    _admit(engine)  # again, for an early 429: the queue may have filled meanwhile
    return engine, prepared


def _pending_stream(
    state: AppState,
    served: ServedModel,
    parsed: NeutralRequest,
    renderer: Renderer,
    kind: str,
    request_id: str,
    progress: bool,
) -> Response:
    """The stream of a request whose model loads: headers now; the lease, ``prepare`` and
    their errors (as the dialect's error frames) inside the stream's own nursery."""
    assembler = Assembler(renderer, logprobs=parsed.logprobs, progress=progress)
    held: list[Lease] = []

    async def start() -> Generation:
        try:
            held.append(await wait_for_lease(state, served))  # no checkpoint in between
            engine, prepared = await _prepare_on(state, served, parsed, kind, request_id)
        except ApiError as exc:
            raise StartFailed(exc.message, exc.code or exc.type, exc.type) from None
        assembler.set_shaping(prepared.shaping)
        return Generation(engine, prepared.gen)

    def release() -> None:  # the body's last step; the start never runs after it
        for lease in held:
            lease.release()

    log.info("request %s: %s waits in its stream for %s to load", request_id, kind, served.name)
    return _stream_response(state, Pending(served.name, start), assembler, release)


def prepare(
    state: AppState, served: ServedModel, parsed: NeutralRequest, request_id: str
) -> _Prepared:
    """Everything costly before generation: runs in a worker thread (not the MLX one)."""
    tokenizer = served.tokenizer
    plan = None
    if parsed.is_chat:  # tools, response_format, reasoning
        plan = plan_chat(parsed, tokenizer, state.chat_template)
    tokens = _prompt_tokens(state, served, parsed, plan)
    gen = parsed.generation_request(
        tuple(tokens),
        default_max_tokens=state.config.max_tokens,
        default_temperature=state.config.default_temperature,
        request_id=request_id,
    )
    # Prompt plus output never exceeds the context: the KV cache per slot stays bounded and
    # no request holds a slot without end. A larger max_tokens is clamped (the answer then
    # ends with finish_reason "length"), as llama.cpp and mlx-lm do, rather than refused.
    room = context_limit(state, served) - len(tokens)
    gen = replace(gen, max_tokens=min(gen.max_tokens, room))
    if parsed.speculation == "draft-model" and not state.config.draft_model:
        raise BadRequest(
            "speculation 'draft-model' needs a server started with --draft-model",
            param="speculation",
        )
    if parsed.prediction:  # Predicted Outputs: tokenized here, off the MLX thread
        predicted = tokenizer.encode(parsed.prediction, add_special_tokens=False)
        gen = replace(gen, prediction_tokens=tuple(predicted))
    shaping = None
    if plan is not None:
        shaping = shaping_for_prompt(plan, tokenizer, tokens)
        # The grammar compiles here, once; the worker gets the ready matcher.
        gen = replace(gen, constraint=build_constraint_processor(plan, tokenizer))
    return _Prepared(gen, plan, shaping)


def _engine(served: ServedModel) -> Engine:
    # A leased model keeps its engine until the lease is returned.
    assert served.engine is not None, f"{served.name} is leased but has no engine"
    return served.engine


def context_limit(state: AppState, served: ServedModel) -> int:
    """Tokens of prompt plus output one request may use: the model's context, or less
    with ``--ctx-size``."""
    return state.config.context_limit(served.context_length)


def _prompt_tokens(
    state: AppState, served: ServedModel, parsed: NeutralRequest, plan: ChatPlan | None
) -> list[int]:
    tokenizer = served.tokenizer
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
    vocab = min(len(tokenizer), served.vocab_size or len(tokenizer))
    if any(t >= vocab for t in tokens):
        raise BadRequest(
            f"Token ids must be below the vocabulary size {vocab}.", param=parsed.prompt_param
        )
    limit = context_limit(state, served)
    if len(tokens) >= limit:
        param = parsed.prompt_param
        raise ContextLengthExceeded(
            f"This server's context length is {limit} tokens, but the prompt has "
            f"{len(tokens)} tokens (at least one more is needed for the answer).",
            param=param,
        )
    return tokens


def _admit(engine: Engine) -> None:
    """An early 503 or 429 (with Retry-After) before any work; ``engine.admit`` is the bound."""
    try:
        engine.check_admission()
    except EngineNotReady as exc:
        raise ServiceUnavailable(
            str(exc) or "The model is still loading.", retry_after_s=2
        ) from None
    except QueueFull as exc:
        raise RateLimited(
            f"The server is busy: {exc}.", code="queue_full", retry_after_s=2
        ) from None


def _stream_response(
    state: AppState,
    source: Generation | Pending,
    assembler: Assembler,
    on_close: Callable[[], None],
) -> Response:
    options = StreamOptions(
        heartbeat_interval_s=state.config.heartbeat_interval_s,
        keepalive_s=state.config.sse_keepalive_s,
        send_timeout_s=state.config.send_timeout_s,
        drain=state.drain,
        observer=state.metrics.observer(),
    )
    body = SSEBody(source, assembler, options, on_close=on_close)
    response = Response(body, status=200, headers=SSE_HEADERS)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT must never cut a stream
    return response


async def _complete(
    state: AppState, engine: Engine, gen: GenerationRequest, assembler: Assembler
) -> tuple[dict[str, Any], int]:
    async def collect(event: Event) -> None:
        assembler.add(event)

    ending = await run_generation(
        engine,
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
