"""``create_app``: the Quart-Trio application, its error handling, auth and CORS.

The model pool (``engine/pool.py``) is a task of the lifespan nursery (``app.nursery``), the
server-owned scope that outlives every request: it starts when serving starts and is
cancelled, every model's engine and worker thread with it, when serving stops. With one
model, ``/health`` answers 503 until it is loaded; with several, 200 once the pool runs.
"""

from __future__ import annotations

import hmac
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
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
from trioserve.api.models import REQUEST_END_KEY
from trioserve.api.routes import routes
from trioserve.api.state import AppState, app_state
from trioserve.blas import user_thread_count
from trioserve.config import ConfigError, ModelEntry, ServerConfig
from trioserve.drain import Drain
from trioserve.engine.pool import ModelFacts, ModelPool, ServedModel
from trioserve.engine.scheduler import Engine, EngineConfig, WorkerFactory
from trioserve.engine.speculation import SpeculationConfig
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

    One model (``config.model``): it is resolved here and loaded when serving starts. When its
    engine stops on an error, every outstanding request fails with its cause, ``/health`` and
    every later request answer 503 with it, and ``on_engine_failure`` is called with it
    (``trioserve serve`` then shuts down and exits with status 1). Without a callback (the
    Hypercorn factory) the process keeps answering 503 so that a supervisor watching
    ``/health`` can restart it; the engine is not restarted in-process, since a fault that
    killed it once would likely kill it again. ``engine`` replaces that model's engine.

    Several models (``config.models``): the first is loaded when serving starts, the others
    on a request's demand (``engine/pool.py``). A model whose engine fails, or that cannot be
    resolved or loaded, becomes ``failed``: its requests get 503 with the cause, ``/health``
    and ``/v1/models`` show it, the other models go on serving, the server does not exit and
    ``on_engine_failure`` is not called, and the model is not loaded again in-process (for
    the same reason as above; restart the server to retry it).

    ``worker_factory`` replaces the MLX worker (tests: fault injection at real seams).
    """
    config = config or ServerConfig.from_env()
    # Read once: a bad file fails the start, and requests do no file I/O.
    chat_template = (
        read_chat_template(config.chat_template) if config.chat_template is not None else None
    )

    drain = Drain(config.shutdown_grace_s)

    def build_engine(facts: ModelFacts) -> Engine:
        return _build_engine(config, facts, worker_factory, drain)

    entries = config.model_entries()
    if len(entries) == 1:
        # `trioserve serve` passes the directory it resolved; the Hypercorn factory launch
        # (TRIOSERVE_MODEL) resolves here, converting on first use with its steps on stderr.
        resolved = _resolve(config, entries[0].source)
        facts = _inspect(resolved.path)
        served = ServedModel(entries[0].name or resolved.name, entries[0].source, facts=facts)
        served.engine = engine or build_engine(facts)
        models = [served]
    else:
        models = _several_models(entries)
    pool = ModelPool(
        models,
        build_engine=build_engine,
        resolve=lambda spec: _inspect(_resolve(config, spec).path),
        max_loaded=config.max_loaded_models,
        ttl_s=config.model_ttl_s,
        queue_timeout_s=config.queue_timeout_s,
        on_failure=on_engine_failure if len(models) == 1 else None,
    )
    app = QuartTrio("trioserve", static_folder=None)  # /static/ is the playground's (web/)
    app.config["RESPONSE_TIMEOUT"] = None  # streams end when generation does, not at 60 s
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["trioserve"] = AppState(
        config=config,
        models=pool,
        created=int(time.time()),
        drain=drain,
        metrics=Metrics(lambda: [(m.name, m.stats()) for m in pool.models], per_model=pool.several),
        chat_template=chat_template,
        responses=ResponseStore(config.responses_store_size, config.responses_store_ttl_s),
    )
    app.register_blueprint(routes)
    if config.debug_endpoints:
        app.register_blueprint(debug_routes)
    if config.ui:
        app.register_blueprint(web)  # the playground at /; its paths need no API key
    _install_error_handlers(app)
    _install_auth_and_cors(app, config)
    app.asgi_app = _run_callbacks_at_request_end(app.asgi_app)  # type: ignore[method-assign]

    @app.before_serving
    async def start_models() -> None:
        await app.nursery.start(pool.run)

    return app


def _several_models(entries: list[ModelEntry]) -> list[ServedModel]:
    from trioserve.models.sources import default_name

    models: list[ServedModel] = []
    for entry in entries:
        name = entry.name or default_name(entry.source)
        if any(m.name == name for m in models):
            raise ConfigError(
                "models", f"serve two models as {name!r}; name them apart with NAME=SOURCE"
            )
        models.append(ServedModel(name, entry.source))
    return models


def _resolve(config: ServerConfig, spec: str | Path | None):  # -> ResolvedModel
    from trioserve.models.sources import resolve

    return resolve(spec, dtype=config.dtype, progress=_progress)


def _inspect(model_dir: Path) -> ModelFacts:
    """What requests need to know of a resolved model, read once from its directory."""
    from trioserve.engine.model_memory import weight_bytes
    from trioserve.models.loading import model_context_length, model_vocab_size

    return ModelFacts(
        path=model_dir,
        context_length=model_context_length(model_dir),
        vocab_size=model_vocab_size(model_dir),
        weight_bytes=weight_bytes(model_dir),
    )


def _build_engine(
    config: ServerConfig,
    facts: ModelFacts,
    worker_factory: WorkerFactory | None,
    drain: Drain | None = None,
) -> Engine:
    from trioserve.engine.distributed.group import current_group
    from trioserve.engine.distributed.leader import leader_factory

    group = current_group()
    if worker_factory is None and group is not None:  # rank 0 of several
        worker_factory = leader_factory(group, config.rank_timeout_s, drain)
    return Engine(engine_config(config, facts.path, facts.context_length, worker_factory))


def engine_config(
    config: ServerConfig,
    model_dir: Path,
    context_length: int,
    worker_factory: WorkerFactory | None = None,
) -> EngineConfig:
    """How the engine of ``model_dir`` runs under ``config``; the same on every rank."""
    from trioserve.engine.distributed.group import current_group
    from trioserve.models.loading import load_model

    group = current_group()
    shard = group.group if group is not None else None
    extra = {"worker_factory": worker_factory} if worker_factory is not None else {}
    blas_threads = _blas_threads(config)
    if group is not None and blas_threads == "auto":
        # Every rank keeps the count it started with, so that a layer each rank computes
        # for itself rounds alike everywhere (else their tokens could differ).
        blas_threads = None
    load_draft = None
    if config.draft_model and group is None:  # the ranks do not draft (yet)
        draft_dir = _resolve(config, config.draft_model).path
        load_draft = partial(load_model, draft_dir)
    return EngineConfig(
        load=lambda: _load_on_worker(partial(load_model, shard_group=shard), model_dir),
        parallel=config.parallel,
        prefill_step_size=config.prefill_step_size,
        solo_prefill_step_size=config.solo_prefill_step_size,
        max_queue=config.max_queue,
        queue_timeout_s=config.queue_timeout_s,
        prefix_cache_bytes=config.prefix_cache_mb * 1024 * 1024,
        speculation=SpeculationConfig(
            mode=config.speculation,
            num_draft=config.speculation_draft_tokens,
            allowed=group is None,  # the ranks of a group do not share drafts (yet)
            load_draft=load_draft,
        ),
        context_tokens=config.context_limit(context_length),
        blas_threads=blas_threads,
        **extra,
    )


def _blas_threads(config: ServerConfig) -> int | str | None:
    """The engine's BLAS thread setting: ``--blas-threads``, else the user's
    OPENBLAS_NUM_THREADS (left as OpenBLAS read it), else ``auto``. ``auto`` changes
    OpenBLAS's one process-wide count between its own steps only, so it needs to be the only
    engine computing: with several models loaded at once it falls back to one thread."""
    setting = config.blas_threads
    if setting is None:
        if user_thread_count() is not None:
            return None
        setting = "auto"
    if setting != "auto":
        return setting
    if len(config.models) > 1 and config.max_loaded_models > 1:
        logging.getLogger("trioserve").warning(
            "--blas-threads auto needs one loaded model at a time (--max-loaded-models 1); "
            "using one BLAS thread"
        )
        return 1
    return "auto"


def _run_callbacks_at_request_end(asgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the ASGI app: callbacks a request registered (``api.models.at_request_end``)
    run when its HTTP exchange is over, however it ended, its streamed body included."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return
        callbacks: list[Callable[[], None]] = []
        scope[REQUEST_END_KEY] = callbacks  # type: ignore[typeddict-unknown-key]
        try:
            await asgi_app(scope, receive, send)
        finally:
            for callback in callbacks:
                callback()

    return app


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_on_worker(load: Callable[[Path], Any], model_dir: Path) -> Any:
    """The engine's load step, on the MLX thread: the BLAS self-check runs MLX too."""
    from trioserve.blas import log_blas_report

    log_blas_report(logging.getLogger("trioserve"))
    return load(model_dir)


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
