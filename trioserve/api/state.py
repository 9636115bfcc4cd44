"""What the routes share: the config, the engine and facts about the served model."""

from __future__ import annotations

from dataclasses import dataclass, field

from quart import current_app

from trioserve.config import ServerConfig
from trioserve.engine.scheduler import Engine
from trioserve.lifecycle import Drain
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
    load_error: str | None = None
    extras: dict[str, object] = field(default_factory=dict)


def app_state() -> AppState:
    return current_app.extensions["trioserve"]
