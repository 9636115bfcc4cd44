"""What the routes share: the config, the model pool and the server-wide stores."""

from __future__ import annotations

from dataclasses import dataclass, field

from quart import current_app

from trioserve.api.dialects.responses.store import ResponseStore
from trioserve.config import ServerConfig
from trioserve.drain import Drain
from trioserve.engine.pool import ModelPool
from trioserve.metrics import Metrics


@dataclass
class AppState:
    config: ServerConfig
    models: ModelPool  # every served model; each loaded one has its own engine
    created: int
    drain: Drain
    metrics: Metrics
    chat_template: str | None = None  # the --chat-template text, read once at start-up
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses store


def app_state() -> AppState:
    return current_app.extensions["trioserve"]
