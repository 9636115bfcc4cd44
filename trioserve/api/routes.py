"""The HTTP routes: OpenAI's endpoints plus ``/health``."""

from __future__ import annotations

from quart import Blueprint, Response, request

from trioserve.api.dialects.chat import ChunkRenderer, chat_to_neutral, completion_to_neutral
from trioserve.api.dialects.messages import endpoint as messages
from trioserve.api.dialects.responses import endpoint as responses
from trioserve.api.generation import handle_generation
from trioserve.api.models import model_health, model_object, pick
from trioserve.api.schemas import parse_chat_request, parse_completion_request
from trioserve.api.state import app_state
from trioserve.engine.pool import ServedModel
from trioserve.metrics import CONTENT_TYPE
from trioserve.output.chunks import ChunkBuilder

routes = Blueprint("openai", __name__)


@routes.post("/v1/chat/completions")
async def chat_completions():
    parsed = parse_chat_request(await request.get_data(cache=False))
    served = pick(app_state(), parsed.model)
    neutral = chat_to_neutral(parsed)
    return await handle_generation(
        neutral, _chunk_renderer("chat", neutral, served), "chat", served
    )


@routes.post("/v1/completions")
async def completions():
    parsed = parse_completion_request(await request.get_data(cache=False))
    served = pick(app_state(), parsed.model)
    neutral = completion_to_neutral(parsed)
    return await handle_generation(
        neutral, _chunk_renderer("completion", neutral, served), "completion", served
    )


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


def _chunk_renderer(kind, neutral, served: ServedModel) -> ChunkRenderer:  # "chat"|"completion"
    builder = ChunkBuilder.new(kind, served.name)
    return ChunkRenderer(builder, logprobs=neutral.logprobs, include_usage=neutral.include_usage)


@routes.get("/v1/models")
async def list_models():
    state = app_state()
    return {"object": "list", "data": [model_object(state, m) for m in state.models.models]}


@routes.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    from trioserve.api.errors import NotFound

    state = app_state()
    served = next((m for m in state.models.models if m.name == model_id), None)
    if served is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return model_object(state, served)


@routes.get("/metrics")
async def metrics():
    body = app_state().metrics.render()
    return Response(body, status=200, content_type=CONTENT_TYPE)


@routes.get("/health")
async def health():
    """One model: as ever (503 until loaded, then 200; 503 with the cause once it failed).
    Several: 200 while the pool runs, a line per model, and the first model's figures at
    the top level, where monitors of a single-model server read them. Either way, from the
    first SIGINT/SIGTERM on: 503, ``"status": "draining"``, so a load balancer's health check
    takes this replica out at once while its in-flight streams finish (deploy/README.md)."""
    state = app_state()
    pool = state.models
    default = pool.default
    stats = default.stats()
    body = {
        "model": default.name,
        "slots_total": stats.slots_total if stats else state.config.parallel,
        "slots_busy": stats.slots_busy if stats else 0,
        "queue_length": stats.queue_length if stats else 0,
        "in_batch": stats.worker.in_batch if stats else 0,
    }
    if state.drain.draining:
        return {"status": "draining", **body}, 503
    if pool.several:
        ok = pool.running
        body = {"status": "ok" if ok else "loading", **body}
        body["models"] = [model_health(state, m) for m in pool.models]
        return body, 200 if ok else 503
    assert stats is not None  # one model: its engine exists from the start
    failure = default.engine.failure if default.engine is not None else None
    body = {"status": "ok" if stats.ready else ("error" if failure else "loading"), **body}
    if failure:
        body["error"] = failure
    return body, 200 if stats.ready else 503
