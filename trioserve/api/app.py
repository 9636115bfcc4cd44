"""``create_app``: the Quart-Trio application, its error handling, auth and CORS.

The engine is a task of the lifespan nursery (``app.nursery``), the server-owned scope that
outlives every request: it starts when serving starts and is cancelled, worker thread and
all, when serving stops. ``/health`` answers 503 until the model is loaded.
"""

from __future__ import annotations

import hmac
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.api.debug import debug_routes
from trioserve.api.dialects.messages.endpoint import PATH_PREFIX as MESSAGES_PREFIX
from trioserve.api.dialects.messages.errors import anthropic_error_body, anthropic_status
from trioserve.api.dialects.responses.store import ResponseStore
from trioserve.api.errors import (
    ApiError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    as_api_error,
)
from trioserve.api.routes import routes
from trioserve.api.state import AppState, app_state
from trioserve.config import ServerConfig
from trioserve.drain import Drain
from trioserve.engine.scheduler import Engine, EngineConfig, WorkerFactory
from trioserve.metrics import Metrics
from trioserve.models.chat_template import read_chat_template
from trioserve.web.routes import is_ui_path, web

log = logging.getLogger("trioserve.api")

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
PUBLIC_PATHS = {"/health"}


def create_app(
    config: ServerConfig | None = None,
    engine: Engine | None = None,
    *,
    on_engine_failure: Callable[[str], None] | None = None,
    worker_factory: WorkerFactory | None = None,
) -> QuartTrio:
    """Build the app. With no arguments, configure from ``TRIOSERVE_*`` environment variables
    (the ``hypercorn --worker-class trio 'trioserve.app:create_app()'`` launch).

    When the engine stops on an error, every outstanding request fails with its cause,
    ``/health`` and every later request answer 503 with it, and ``on_engine_failure`` is
    called with it (``trioserve serve`` then shuts down and exits with status 1). Without a
    callback (the Hypercorn factory) the process keeps answering 503 so that a supervisor
    watching ``/health`` can restart it; the engine is not restarted in-process, since a
    fault that killed it once would likely kill it again.
    ``worker_factory`` replaces the MLX worker (tests: fault injection at real seams).
    """
    from trioserve.models.loading import load_model, model_context_length, model_vocab_size
    from trioserve.models.sources import resolve

    config = config or ServerConfig.from_env()
    # Read once: a bad file fails the start, and requests do no file I/O.
    chat_template = (
        read_chat_template(config.chat_template) if config.chat_template is not None else None
    )
    # `trioserve serve` passes the directory it resolved; the Hypercorn factory launch
    # (TRIOSERVE_MODEL) resolves here, converting on first use with its steps on stderr.
    resolved = resolve(config.model, dtype=config.dtype, progress=_progress)
    model_dir = resolved.path
    if engine is None:
        extra = {"worker_factory": worker_factory} if worker_factory is not None else {}
        engine = Engine(
            EngineConfig(
                load=lambda: _load_on_worker(load_model, model_dir),
                parallel=config.parallel,
                prefill_step_size=config.prefill_step_size,
                solo_prefill_step_size=config.solo_prefill_step_size,
                max_queue=config.max_queue,
                queue_timeout_s=config.queue_timeout_s,
                prefix_cache_bytes=config.prefix_cache_mb * 1024 * 1024,
                **extra,
            )
        )
    model_id = config.served_model_name or resolved.name
    app = QuartTrio("trioserve", static_folder=None)  # /static/ is the playground's (web/)
    app.config["RESPONSE_TIMEOUT"] = None  # streams end when generation does, not at 60 s
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["trioserve"] = AppState(
        config=config,
        engine=engine,
        model_id=model_id,
        context_length=model_context_length(model_dir),
        created=int(time.time()),
        drain=Drain(config.shutdown_grace_s),
        metrics=Metrics(engine.stats),
        chat_template=chat_template,
        vocab_size=model_vocab_size(model_dir),
        responses=ResponseStore(config.responses_store_size, config.responses_store_ttl_s),
    )
    app.register_blueprint(routes)
    if config.debug_endpoints:
        app.register_blueprint(debug_routes)
    if config.ui:
        app.register_blueprint(web)  # the playground at /; its paths need no API key
    _install_error_handlers(app)
    _install_auth_and_cors(app, config)

    @app.before_serving
    async def start_engine() -> None:
        app.nursery.start_soon(_run_engine, app.extensions["trioserve"], on_engine_failure)

    return app


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_on_worker(load: Callable[[Path], Any], model_dir: Path) -> Any:
    """The engine's load step, on the MLX thread: the BLAS self-check runs MLX too."""
    from trioserve.blas import log_blas_report

    log_blas_report(logging.getLogger("trioserve"))
    return load(model_dir)


async def _run_engine(state: AppState, on_failure: Callable[[str], None] | None) -> None:
    try:
        await state.engine.run()
    except Exception:
        # Engine.run failed every outstanding request and keeps the cause in
        # engine.failure: /health and every later request show it. Never silent.
        log.critical("%s", state.engine.failure, exc_info=True)
        if on_failure is not None:
            on_failure(state.engine.failure or "the model engine stopped")


def _error_response(err: ApiError) -> Response:
    """The error in the shape of the dialect the request was for: Anthropic's on its
    endpoints, OpenAI's everywhere else."""
    body, status = err.body(), err.status
    if request.path.startswith(MESSAGES_PREFIX):
        body, status = anthropic_error_body(err), anthropic_status(err)
    response = Response(_json(body), status=status, content_type="application/json")
    for name, value in err.headers().items():
        response.headers[name] = value
    return response


def _json(obj: object) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def _install_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(err: ApiError) -> Response:
        return _error_response(err)

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        if err.code == 404:
            mapped: ApiError = NotFound(f"Unknown route: {request.method} {request.path}")
        elif err.code == 405:
            allowed = getattr(err, "valid_methods", None) or ()
            mapped = MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.path}.", allowed=allowed
            )
        elif err.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            mapped = PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        else:
            mapped = ApiError(err.description or err.name)
            mapped.status = err.code or 500
            mapped.type = "invalid_request_error" if mapped.status < 500 else "server_error"
        return _error_response(mapped)

    @app.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(as_api_error(err))


def _install_auth_and_cors(app: QuartTrio, config: ServerConfig) -> None:
    from trioserve.api.security import HostPolicy, check_json_content_type

    origins = set(config.cors_origins)
    hosts = HostPolicy(config.host, config.api_key, config.allowed_hosts)

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        if not origins or origin is None:
            return None
        if "*" in origins:
            return "*"
        return origin if origin in origins else None

    @app.before_request
    async def preflight_and_auth() -> Response | None:
        # Every path, the playground's too: a DNS-rebinding page could drive it (security.py).
        hosts.check(request.headers.get("Host") or request.headers.get(":authority"))
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            response = Response("", status=204)
            origin = allowed_origin()
            if origin is not None:
                # Reflect the asked-for headers: SDKs send X-Stainless-* and friends.
                asked = request.headers.get("Access-Control-Request-Headers", "")
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                if asked:
                    response.headers["Access-Control-Allow-Headers"] = asked
                response.headers["Access-Control-Max-Age"] = "600"
                response.headers["Vary"] = "Origin, Access-Control-Request-Headers"
            return response
        public = request.path in PUBLIC_PATHS or (config.ui and is_ui_path(request.path))
        if config.api_key and not public:
            # OpenAI clients send "Authorization: Bearer KEY", Anthropic's "x-api-key: KEY".
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" else None
            anthropic_key = request.headers.get("x-api-key")
            ok = any(
                hmac.compare_digest(key.encode(), config.api_key.encode())
                for key in (bearer, anthropic_key)
                if key is not None
            )
            if not ok:
                raise Unauthorized(
                    "Missing API key." if not (given or anthropic_key) else "Invalid API key.",
                )
        # Only on routes that exist: an unknown path or method stays a 404/405.
        if config.require_json_content_type and request.method == "POST" and request.url_rule:
            check_json_content_type(request.mimetype)
        return None

    @app.after_request
    async def count_request(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        app_state().metrics.requests.labels(endpoint=rule, status=response.status_code).inc()
        return response

    @app.after_request
    async def cors_headers(response: Response) -> Response:
        origin = allowed_origin()
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response


__all__ = ["app_state", "create_app"]
