"""The HTTP routes: OpenAI's endpoints plus ``/health``."""

from __future__ import annotations

from quart import Blueprint, Response, request

from trioserve.api.dialects.chat import ChunkRenderer, chat_to_neutral, completion_to_neutral
from trioserve.api.dialects.messages import endpoint as messages
from trioserve.api.dialects.responses import endpoint as responses
from trioserve.api.generation import handle_generation
from trioserve.api.schemas import parse_chat_request, parse_completion_request
from trioserve.api.state import app_state
from trioserve.metrics import CONTENT_TYPE
from trioserve.output.chunks import ChunkBuilder

routes = Blueprint("openai", __name__)


@routes.post("/v1/chat/completions")
async def chat_completions():
    neutral = chat_to_neutral(parse_chat_request(await request.get_data(cache=False)))
    return await handle_generation(neutral, _chunk_renderer("chat", neutral), "chat")


@routes.post("/v1/completions")
async def completions():
    neutral = completion_to_neutral(parse_completion_request(await request.get_data(cache=False)))
    return await handle_generation(neutral, _chunk_renderer("completion", neutral), "completion")


@routes.post("/v1/responses")
async def responses_create():
    return await responses.create_response(app_state(), await request.get_data(cache=False))


@routes.get("/v1/responses/<response_id>")
async def responses_get(response_id: str):
    return responses.get_response(app_state(), response_id)


@routes.delete("/v1/responses/<response_id>")
async def responses_delete(response_id: str):
    return responses.delete_response(app_state(), response_id)


# Anthropic's clients add ?beta=true; the query string never changes routing.
@routes.post("/v1/messages")
async def messages_create():
    return await messages.create_message(app_state(), await request.get_data(cache=False))


@routes.post("/v1/messages/count_tokens")
async def messages_count_tokens():
    return await messages.count_tokens(app_state(), await request.get_data(cache=False))


def _chunk_renderer(kind, neutral) -> ChunkRenderer:  # kind: "chat" | "completion"
    builder = ChunkBuilder.new(kind, app_state().model_id)
    return ChunkRenderer(builder, logprobs=neutral.logprobs, include_usage=neutral.include_usage)


@routes.get("/v1/models")
async def list_models():
    state = app_state()
    model = {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "trioserve",
    }
    return {"object": "list", "data": [model]}


@routes.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    from trioserve.api.errors import NotFound

    state = app_state()
    if model_id != state.model_id:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "trioserve",
    }


@routes.get("/metrics")
async def metrics():
    body = app_state().metrics.render()
    return Response(body, status=200, content_type=CONTENT_TYPE)


@routes.get("/health")
async def health():
    state = app_state()
    stats = state.engine.stats()
    body = {
        "status": "ok" if stats.ready else ("error" if state.load_error else "loading"),
        "model": state.model_id,
        "slots_total": stats.slots_total,
        "slots_busy": stats.slots_busy,
        "queue_length": stats.queue_length,
        "in_batch": stats.worker.in_batch,
    }
    if state.load_error:
        body["error"] = state.load_error
    return body, 200 if stats.ready else 503
