"""``create_app``: the Quart-Trio application, its error handling, auth and CORS.

The engine is a task of the lifespan nursery (``app.nursery``), the server-owned scope that
outlives every request: it starts when serving starts and is cancelled, worker thread and
all, when serving stops. ``/health`` answers 503 until the model is loaded.
"""

from __future__ import annotations

import hmac
import logging
import time

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.api.debug import debug_routes
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
from trioserve.engine.params import GenerationRequest
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.engine.worker import FaultHook
from trioserve.lifecycle import Drain
from trioserve.metrics import Metrics
from trioserve.models.chat_template import read_chat_template
from trioserve.web.routes import is_ui_path, web

log = logging.getLogger("trioserve.api")

CORS_METHODS = "GET, POST, OPTIONS"
PUBLIC_PATHS = {"/health"}


def create_app(config: ServerConfig | None = None, engine: Engine | None = None) -> QuartTrio:
    """Build the app. With no arguments, configure from ``TRIOSERVE_*`` environment variables
    (the ``hypercorn --worker-class trio 'trioserve.app:create_app()'`` launch)."""
    from trioserve.models.loading import load_model, model_context_length
    from trioserve.models.registry import default_model_name, resolve_model

    config = config or ServerConfig.from_env()
    # Read once: a bad file fails the start, and requests do no file I/O.
    chat_template = (
        read_chat_template(config.chat_template) if config.chat_template is not None else None
    )
    model_dir = resolve_model(str(config.model) if config.model else None, dtype=config.dtype)
    test_faults: dict[str, str] | None = {} if config.test_faults else None
    if engine is None:
        engine = Engine(
            EngineConfig(
                load=lambda: load_model(model_dir),
                parallel=config.parallel,
                prefill_step_size=config.prefill_step_size,
                solo_prefill_step_size=config.solo_prefill_step_size,
                max_queue=config.max_queue,
                queue_timeout_s=config.queue_timeout_s,
                prefix_cache_bytes=config.prefix_cache_mb * 1024 * 1024,
                fault_hook=_fault_hook(test_faults) if test_faults is not None else None,
            )
        )
    model_id = config.served_model_name or (
        default_model_name() if config.model is None else model_dir.name
    )
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
    )
    if test_faults is not None:
        app.extensions["trioserve"].extras["test_faults"] = test_faults
    app.register_blueprint(routes)
    if config.debug_endpoints:
        app.register_blueprint(debug_routes)
    if config.ui:
        app.register_blueprint(web)  # the playground at /; its paths need no API key
    _install_error_handlers(app)
    _install_auth_and_cors(app, config)

    @app.before_serving
    async def start_engine() -> None:
        app.nursery.start_soon(_run_engine, app)

    return app


def _fault_hook(faults: dict[str, str]) -> FaultHook:
    """Tests only: fail the request whose id was registered, in the phase it names."""

    def hook(phase: str, request: GenerationRequest) -> None:
        if faults.get(request.request_id) == phase:
            raise RuntimeError(f"injected {phase} fault")

    return hook


async def _run_engine(app: QuartTrio) -> None:
    state: AppState = app.extensions["trioserve"]
    from trioserve.blas import log_blas_report

    log_blas_report(logging.getLogger("trioserve"))
    try:
        await state.engine.run()
    except Exception as exc:
        # /health turns to 503 with the reason; requests get it too. Never silent.
        state.load_error = f"the model engine stopped: {exc}"
        log.critical("%s", state.load_error, exc_info=True)
        on_failure = state.extras.get("on_engine_failure")
        if callable(on_failure):
            on_failure(state.load_error)


def _error_response(err: ApiError) -> Response:
    response = Response(_json(err.body()), status=err.status, content_type="application/json")
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
    origins = set(config.cors_origins)

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        if not origins or origin is None:
            return None
        if "*" in origins:
            return "*"
        return origin if origin in origins else None

    @app.before_request
    async def preflight_and_auth() -> Response | None:
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
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), config.api_key.encode()
            )
            if not ok:
                raise Unauthorized(
                    "Missing API key." if not given else "Invalid API key.",
                )
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
