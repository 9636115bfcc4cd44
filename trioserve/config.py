"""The server's one typed configuration, with units in the names, checked when it is made.

A bad value (``--parallel 0``, a negative timeout) is a ``ConfigError`` at start-up that names
the setting, never a failure deep in Trio or a busy loop later. ``trioserve serve`` prints it
as one line and exits with status 2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

# "auto": float32 on the CPU, "quantized" (kept 4/8-bit where MLX has the kernels) on a GPU.
DTYPES = ("auto", "float32", "float16", "bfloat16", "quantized")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# NAME in `--model NAME=SOURCE`: what a client sends as `model`. No '/', ':' or '=', so an
# Ollama source (ollama:qwen2.5:1.5b), a Hub id (owner/name) or a path is never split.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The smallest --ctx-size: a chat template's own markup takes a dozen tokens, so anything
# below this could not hold a one-word question and its answer.
MIN_CTX_SIZE = 16
SPECULATION_MODES = ("off", "prompt-lookup", "draft-model")  # as engine/speculation.py's MODES


class ConfigError(ValueError):
    """A configuration value that the server cannot run with.

    ``field`` is the setting's name as the caller wrote it (``parallel``, or
    ``TRIOSERVE_PARALLEL`` from the environment); ``reason`` completes the sentence
    ("must be at least 1, got 0"). The command line swaps ``field`` for the flag's name.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``trioserve serve`` and ``create_app()`` are configured with.

    Defaults are what a local single-user laptop wants; each is a ``--flag`` and, for the
    ``hypercorn 'trioserve.app:create_app()'`` launch, a ``TRIOSERVE_*`` environment variable.
    """

    # A `--model` value (a directory, a Hub repo id, ollama:NAME, a .gguf file, each
    # optionally NAME=SOURCE; see trioserve/models/sources/); None: the embedded
    # SmolLM2-135M-Instruct. One model: loaded at start and never unloaded.
    model: str | Path | None = None
    # Several models (`--model` repeated), each SOURCE or NAME=SOURCE, in order; the first is
    # loaded at start, the others on demand (engine/pool.py). Empty: `model` alone is served.
    models: tuple[str, ...] = ()
    # With several models: how many may be loaded at once (the least recently used idle one
    # is unloaded to make room); 1 by default, since two models rarely fit a small machine.
    max_loaded_models: int = 1
    # With several models: a model idle (no request) this long is unloaded; 0: never.
    model_ttl_s: float = 0.0
    # Under mlx.launch (several ranks): how long rank 0 waits for the other ranks to answer
    # before it fails its requests and exits (a rank that died is noticed within ~1 s).
    rank_timeout_s: float = 30.0
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 8
    # Prompt tokens per model call. While others decode: 64 keeps each chunk near 0.3 s on a
    # 2-core CPU, so decoding streams are not frozen while a long prompt is read. Alone: 256
    # (SmolLM2, 1513-token prompt: 6.5-6.6 s against 7.0 s at 64); a hang-up cuts a chunk
    # between layers either way (engine/prefill_gate.py).
    prefill_step_size: int = 64
    solo_prefill_step_size: int = 256
    max_tokens: int = 2048  # default cap when a request names none
    # Bound on prompt plus generated tokens for every request (and so the KV memory per
    # slot); None: the model's own context length. llama.cpp's --ctx-size.
    ctx_size: int | None = None
    cors_origins: tuple[str, ...] = ()
    api_key: str | None = None
    heartbeat_interval_s: float = 2.0
    sse_keepalive_s: float = 0.0  # 0: no SSE comment lines at all (strict by default)
    max_body_bytes: int = 8 * 1024 * 1024
    default_temperature: float = 1.0
    log_level: str = "info"
    served_model_name: str | None = None
    chat_template: Path | None = None  # a Jinja file that overrides the model's chat template
    prefix_cache_mb: int = 512  # KV cache kept to reuse shared prompt prefixes; 0: off
    # Speculative decoding for requests that do not choose (a ``prediction`` always drafts):
    # off | prompt-lookup | draft-model; and the most draft tokens one sequence proposes per
    # step. ``draft_model``: a model source (as ``model``) with the same tokenizer.
    speculation: str = "off"
    speculation_draft_tokens: int = 10
    # OpenBLAS threads per matmul: "auto" (the cores other processes leave free, chosen
    # between steps; engine/blas_threads.py), a count, or None: the user's
    # OPENBLAS_NUM_THREADS if set, else auto.
    blas_threads: str | None = None
    draft_model: str | None = None
    max_queue: int | None = 64  # requests waiting for a slot before 429; None: unbounded
    queue_timeout_s: float | None = 300.0  # longest wait for a slot; None: no limit
    send_timeout_s: float = 30.0  # a stream whose client reads nothing this long is dropped
    shutdown_grace_s: float = 10.0  # on SIGINT/SIGTERM, in-flight work gets this long
    debug_endpoints: bool = False  # /debug/state (task and thread counts) for stress tests
    # Model names a /v1/messages request may ask for and get the served model (fnmatch
    # patterns, e.g. "claude-*" for Claude Code); none: only the served name.
    model_aliases: tuple[str, ...] = ()
    # /v1/responses with store: finished responses kept for previous_response_id and GET.
    responses_store_size: int = 256  # 0: keep none
    responses_store_ttl_s: float = 3600.0
    ui: bool = True  # the web playground at / (off: --no-ui, TRIOSERVE_UI=0)
    # DNS-rebinding defence (api/security.py). Empty: when bound to loopback without an API
    # key, only loopback Host names (localhost, 127.0.0.1, [::1]) are served. Names here are
    # accepted as well, and then always checked; "*" accepts any Host (behind a proxy).
    allowed_hosts: tuple[str, ...] = ()
    # POSTs must say Content-Type: application/json (else 415), so a web page cannot send
    # one as a cross-origin "simple" request. Off: --any-content-type.
    require_json_content_type: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    def context_limit(self, model_context: int) -> int:
        """Tokens of prompt plus output one request may use (so one slot's KV cache at
        most): the model's context length, or less with ``--ctx-size``."""
        return min(model_context, self.ctx_size) if self.ctx_size else model_context

    def model_entries(self) -> list[ModelEntry]:
        """The configured models in order: one entry for the single-model configuration."""
        if self.models:
            return [parse_model_entry(raw) for raw in self.models]
        if isinstance(self.model, str):
            entry = parse_model_entry(self.model)
            return [ModelEntry(self.served_model_name or entry.name, entry.source)]
        return [ModelEntry(self.served_model_name, self.model)]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerConfig:
        """Read ``TRIOSERVE_<FIELD>`` variables (e.g. TRIOSERVE_PARALLEL=4)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"TRIOSERVE_{f.name.upper()}"
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[f.name] = _parse(f.name, raw)
            except ValueError:
                raise ConfigError(name, f"must be {_kind_words(f.name)}, got {raw!r}") from None
        several = split_model_list(env.get("TRIOSERVE_MODEL"))
        if len(several) > 1:  # TRIOSERVE_MODEL="a=./one,b=ollama:two"
            values["models"], values["model"] = tuple(several), None
        try:
            return cls(**values)
        except ConfigError as exc:
            if exc.field in values:  # name the variable the operator actually set
                raise ConfigError(f"TRIOSERVE_{exc.field.upper()}", exc.reason) from None
            raise


@dataclass(frozen=True)
class ModelEntry:
    """One configured model: the name clients ask for (None: the source's own name) and
    the `--model` source."""

    name: str | None
    source: str | Path | None


def parse_model_entry(raw: str) -> ModelEntry:
    """`NAME=SOURCE` or `SOURCE`. Split only when the part before the first '=' is a plain
    name (letters, digits, '.', '_', '-'; no '/', ':' or '=') and the whole text is not an
    existing path, so `ollama:x:7b`, `owner/name`, `./dir=1` stay sources."""
    name, sep, source = raw.partition("=")
    if sep and source and MODEL_NAME.fullmatch(name) and not Path(raw).expanduser().exists():
        return ModelEntry(name, source)
    return ModelEntry(None, raw)


def split_model_list(raw: str | None) -> list[str]:
    """`TRIOSERVE_MODEL` as a list: newline- or comma-separated; an existing path is one."""
    if raw is None or not raw.strip() or Path(raw.strip()).expanduser().exists():
        return [raw.strip()] if raw and raw.strip() else []
    return [part.strip() for part in re.split(r"[\n,]", raw) if part.strip()]


def truthy(raw: str | None) -> bool:
    """An on/off setting from an environment variable or header: 1, true, yes or on, any case."""
    return (raw or "").strip().lower() in {"1", "true", "yes", "on"}


def _validate(c: ServerConfig) -> None:
    """Raise ``ConfigError`` for the first value the server cannot run with."""
    for f in fields(c):  # types first: ServerConfig(parallel="8") is a mistake, not a value
        _check_type(f.name, str(f.type), getattr(c, f.name))
    if c.dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if not c.host.strip():
        raise ConfigError("host", "must not be empty")
    if not 1 <= c.port <= 65535:
        raise ConfigError("port", f"must be between 1 and 65535, got {c.port}")
    _at_least("parallel", c.parallel, 1)
    _at_least("prefill_step_size", c.prefill_step_size, 1)
    _at_least(
        "solo_prefill_step_size",
        c.solo_prefill_step_size,
        0,
        note="0: the same as prefill_step_size",
    )
    _at_least("max_tokens", c.max_tokens, 1)
    if c.ctx_size is not None:
        _at_least("ctx_size", c.ctx_size, MIN_CTX_SIZE)
    _at_least("max_body_bytes", c.max_body_bytes, 1)
    _at_least("prefix_cache_mb", c.prefix_cache_mb, 0, note="0: off")
    if c.speculation not in SPECULATION_MODES:
        raise ConfigError(
            "speculation",
            f"must be one of {', '.join(SPECULATION_MODES)}, got {c.speculation!r}",
        )
    _at_least("speculation_draft_tokens", c.speculation_draft_tokens, 1)
    if c.blas_threads is not None and c.blas_threads != "auto":
        if not (c.blas_threads.isdigit() and 1 <= int(c.blas_threads) <= 256):
            raise ConfigError(
                "blas_threads", f"must be auto or a count from 1 to 256, got {c.blas_threads!r}"
            )
    if c.speculation == "draft-model" and not c.draft_model:
        raise ConfigError("speculation", "draft-model needs a draft model: give --draft-model")
    if c.max_queue is not None:
        _at_least("max_queue", c.max_queue, 0)
    _positive("heartbeat_interval_s", c.heartbeat_interval_s)
    _non_negative("sse_keepalive_s", c.sse_keepalive_s, note="0: off")
    if c.queue_timeout_s is not None:
        _positive("queue_timeout_s", c.queue_timeout_s, note="no limit: none, or --queue-timeout 0")
    _non_negative("send_timeout_s", c.send_timeout_s, note="0: never drop")
    _non_negative("shutdown_grace_s", c.shutdown_grace_s)
    _at_least("responses_store_size", c.responses_store_size, 0, note="0: keep none")
    _positive("responses_store_ttl_s", c.responses_store_ttl_s)
    _validate_models(c)
    if not (math.isfinite(c.default_temperature) and 0.0 <= c.default_temperature <= 2.0):
        raise ConfigError(
            "default_temperature", f"must be between 0 and 2, got {c.default_temperature:g}"
        )
    if c.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(
            "log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {c.log_level!r}"
        )
    for name in ("cors_origins", "allowed_hosts", "model_aliases"):
        for item in getattr(c, name):
            if not item or item != item.strip() or any(ch.isspace() for ch in item):
                raise ConfigError(name, f"must be names without spaces, got {item!r}")
    for host in c.allowed_hosts:
        if "/" in host:
            raise ConfigError(
                "allowed_hosts", f"takes host names, not URLs (no scheme or path), got {host!r}"
            )


def _validate_models(c: ServerConfig) -> None:
    _at_least("max_loaded_models", c.max_loaded_models, 1)
    _non_negative("model_ttl_s", c.model_ttl_s, note="0: never")
    _positive("rank_timeout_s", c.rank_timeout_s)
    if not c.models:
        return
    if c.model is not None:
        raise ConfigError("models", "cannot be combined with model; list every model in models")
    if c.served_model_name is not None and len(c.models) > 1:
        raise ConfigError(
            "served_model_name", "names one model; with several, write --model NAME=SOURCE"
        )
    for raw in c.models:
        if not raw.strip():
            raise ConfigError("models", "must not hold an empty model")


def _check_type(name: str, kind: str, value: object) -> None:
    if value is None and "None" in kind:
        return
    if kind.startswith("tuple"):
        ok = isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    elif kind.startswith("Path"):
        ok = isinstance(value, Path)
    elif kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind.startswith("str | Path"):
        ok = isinstance(value, str | Path)
    elif kind.startswith("str"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(name, f"must be {_kind_words(name)}, got {value!r}")


def _kind_words(name: str) -> str:
    kind = {f.name: str(f.type) for f in fields(ServerConfig)}[name]
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "Path": "a path"}
    word = next((w for k, w in words.items() if kind.startswith(k)), None)
    if kind.startswith("tuple"):
        word = "a list of names"
    word = word or "a string"
    return f"{word} or none" if "None" in kind else word


def _at_least(name: str, value: int, low: int, *, note: str = "") -> None:
    if value < low:
        extra = f" ({note})" if note else ""
        raise ConfigError(name, f"must be at least {low}{extra}, got {value}")


def _positive(name: str, value: float, *, note: str = "") -> None:
    if not (math.isfinite(value) and value > 0):
        extra = f" ({note})" if note else ""
        raise ConfigError(name, f"must be a number of seconds above 0{extra}, got {value:g}")


def _non_negative(name: str, value: float, *, note: str = "") -> None:
    if not (math.isfinite(value) and value >= 0):
        extra = f" ({note})" if note else ""
        raise ConfigError(name, f"must be a number of seconds, 0 or more{extra}, got {value:g}")


def _parse(name: str, raw: str) -> object:
    """Convert one environment value by the field's annotated type."""
    kind = {f.name: str(f.type) for f in fields(ServerConfig)}[name]
    optional = "None" in kind
    if optional and raw.strip().lower() in {"", "none"}:
        return None
    if kind.startswith("Path"):
        return Path(raw)
    if kind.startswith("tuple"):
        return tuple(item for item in raw.replace(",", " ").split() if item)
    if kind.startswith("bool"):
        return truthy(raw)
    if kind.startswith("int"):
        return int(raw.strip())
    if kind.startswith("float"):
        return float(raw.strip())
    return raw
