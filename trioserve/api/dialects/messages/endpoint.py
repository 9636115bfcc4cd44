"""``/v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API.

The request goes through the shared pipeline (``api.generation``) like every dialect's. What
is Anthropic-specific is here: the model name (a served model's name gets that model; any
name the operator aliased with ``--model-alias`` gets the first model listed; the answer names
what was asked for), and token counting through the same templating as a real request.
"""

from __future__ import annotations

import fnmatch
import json
import uuid
from typing import Any

import trio
from quart import Response

from trioserve.api.dialects.messages.mapping import to_neutral
from trioserve.api.dialects.messages.render import MessagesRenderer
from trioserve.api.dialects.messages.schema import parse_messages_request
from trioserve.api.errors import NotFound
from trioserve.api.generation import handle_generation, prepare
from trioserve.api.models import acquire
from trioserve.api.state import AppState
from trioserve.engine.pool import ServedModel

PATH_PREFIX = "/v1/messages"


async def create_message(state: AppState, raw: bytes) -> Response | tuple[dict, int]:
    req = parse_messages_request(raw)
    served = _served_model(state, req.model)
    neutral = to_neutral(req).neutral
    renderer = MessagesRenderer(model=req.model)
    return await handle_generation(neutral, renderer, "messages", served)


async def count_tokens(state: AppState, raw: bytes) -> dict[str, Any]:
    """The prompt's token count, templated exactly as ``create_message`` would."""
    body = _json_object(raw)
    if isinstance(body, dict):
        body.setdefault("max_tokens", 1)  # not part of count_tokens; the schema wants one
        raw = json.dumps(body).encode()
    req = parse_messages_request(raw)
    served = _served_model(state, req.model)
    neutral = to_neutral(req).neutral
    lease = await acquire(state, served)  # the tokenizer is the loaded model's
    try:
        if served.engine is None or served.engine.tokenizer is None:
            from trioserve.api.errors import ServiceUnavailable

            raise ServiceUnavailable("The model is still loading.", retry_after_s=2)
        request_id = uuid.uuid4().hex[:12]
        prepared = await trio.to_thread.run_sync(prepare, state, served, neutral, request_id)
    finally:
        lease.release()
    return {"input_tokens": len(prepared.gen.prompt_tokens)}


def _served_model(state: AppState, asked: str) -> ServedModel:
    """The model named, or the first one for a name matching ``--model-alias``."""
    pool = state.models
    served = next((m for m in pool.models if m.name == asked), None)
    if served is not None:
        return served
    if any(fnmatch.fnmatchcase(asked, pattern) for pattern in state.config.model_aliases):
        return pool.default
    names = ", ".join(repr(name) for name in pool.names())
    raise NotFound(
        f"model: {asked!r} is not served here; this server serves {names}. Ask for "
        f"{'one of those names' if pool.several else 'that name'}, or start the server with "
        f"--model-alias '{_pattern_for(asked)}' (TRIOSERVE_MODEL_ALIASES) to serve "
        f"{'the first' if pool.several else 'it'} under other names.",
        param="model",
        code="model_not_found",
    )


def _pattern_for(name: str) -> str:
    head = name.split("-", 1)[0]
    return f"{head}-*" if head and head != name else name


def _json_object(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None  # the parser reports it
