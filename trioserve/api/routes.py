"""The HTTP routes: OpenAI's endpoints plus ``/health``."""

from __future__ import annotations

from quart import Blueprint, Response, request

from trioserve.api.generation import handle_generation
from trioserve.api.schemas import parse_chat_request, parse_completion_request
from trioserve.api.state import app_state
from trioserve.metrics import CONTENT_TYPE

routes = Blueprint("openai", __name__)


@routes.post("/v1/chat/completions")
async def chat_completions():
    parsed = parse_chat_request(await request.get_data(cache=False))
    return await handle_generation(parsed, "chat")


@routes.post("/v1/completions")
async def completions():
    parsed = parse_completion_request(await request.get_data(cache=False))
    return await handle_generation(parsed, "completion")


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
