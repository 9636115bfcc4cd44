"""What the routes share: the config, the engine and facts about the served model."""

from __future__ import annotations

from dataclasses import dataclass, field

from quart import current_app

from trioserve.api.dialects.responses.store import ResponseStore
from trioserve.config import ServerConfig
from trioserve.drain import Drain
from trioserve.engine.scheduler import Engine
from trioserve.metrics import Metrics


@dataclass
class AppState:
    config: ServerConfig
    engine: Engine
    model_id: str
    context_length: int
    created: int
    drain: Drain
    metrics: Metrics
    chat_template: str | None = None  # the --chat-template text, read once at start-up
    vocab_size: int | None = None  # the model's embedding rows (config.json), if stated
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses store

    @property
    def load_error(self) -> str | None:
        """Why the engine is not serving, once it has stopped (None while loading/serving)."""
        return self.engine.failure


def app_state() -> AppState:
    return current_app.extensions["trioserve"]
