"""``/v1/responses``: parse, continue a stored conversation, run, store.

The request goes through the shared pipeline (``api.generation``) like every dialect's; what
is Responses-specific is here: ``previous_response_id`` (the stored conversation goes before
the new input), the fields a ``response`` object echoes, and storing the finished response
when ``store`` is true (the default).
"""

from __future__ import annotations

from typing import Any

from quart import Response

from trioserve.api.dialects.responses.mapping import MappedRequest, input_messages, to_neutral
from trioserve.api.dialects.responses.render import ResponsesRenderer
from trioserve.api.dialects.responses.schema import ResponsesRequest, parse_responses_request
from trioserve.api.errors import NotFound
from trioserve.api.generation import handle_generation
from trioserve.api.models import pick
from trioserve.api.state import AppState


async def create_response(state: AppState, raw: bytes) -> Response | tuple[dict, int]:
    req = parse_responses_request(raw)
    served = pick(state, req.model)  # the store is the server's: a stored turn may continue
    history = None  # on another model
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise _not_found(req.previous_response_id, param="previous_response_id")
        history = list(stored.conversation)
    mapped = to_neutral(req, history)
    renderer = ResponsesRenderer(
        model=served.name,
        echo=_echo(req),
        tool_names=lambda called: _tool_name(mapped, called),
        on_complete=(lambda final: _store(state, mapped, final)) if req.store else None,
    )
    return await handle_generation(mapped.neutral, renderer, "responses", served)


def get_response(state: AppState, response_id: str) -> dict[str, Any]:
    stored = state.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


def delete_response(state: AppState, response_id: str) -> dict[str, Any]:
    if not state.responses.delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"Response with id {response_id!r} not found (never stored, deleted, or expired).",
        param=param,
        code="response_not_found",
    )


def _tool_name(mapped: MappedRequest, called: str) -> tuple[str, str | None]:
    name = mapped.tool_name(called)
    return name.name, name.namespace


def _store(state: AppState, mapped: MappedRequest, final: dict[str, Any]) -> None:
    """Keep the finished response and its conversation, the output included, for a later
    ``previous_response_id``."""
    replay = ResponsesRequest.model_validate({"input": _replayable(final["output"])})
    conversation = [*mapped.conversation, *input_messages(replay.input)]
    state.responses.put(final["id"], final, conversation)


def _replayable(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as input items (a stored answer replays as the assistant's turn)."""
    items: list[dict[str, Any]] = []
    for item in output:
        if item["type"] == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            items.append({"type": "message", "role": "assistant", "content": text})
        elif item["type"] == "function_call":
            call = {k: item[k] for k in ("call_id", "name", "arguments")}
            if item.get("namespace"):
                call["namespace"] = item["namespace"]
            items.append({"type": "function_call", **call})
    return items


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request fields OpenAI's ``response`` object repeats."""
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else None
    reasoning = req.reasoning.model_dump(exclude_none=True) if req.reasoning else None
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": reasoning or {"effort": None, "summary": None},
        "store": req.store,
        "temperature": req.temperature,
        "text": text or {"format": {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": req.truncation or "disabled",
        "user": req.user,
    }
