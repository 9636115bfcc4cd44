"""The server's one typed configuration, with units in the names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``trioserve serve`` and ``create_app()`` are configured with.

    Defaults are what a local single-user laptop wants; each is a ``--flag`` and, for the
    ``hypercorn 'trioserve.app:create_app()'`` launch, a ``TRIOSERVE_*`` environment variable.
    """

    model: Path | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
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
    max_queue: int | None = 64  # requests waiting for a slot before 429; None: unbounded
    queue_timeout_s: float | None = 300.0  # longest wait for a slot; None: no limit
    send_timeout_s: float = 30.0  # a stream whose client reads nothing this long is dropped
    shutdown_grace_s: float = 10.0  # on SIGINT/SIGTERM, in-flight work gets this long
    debug_endpoints: bool = False  # /debug/state (task and thread counts) for stress tests
    test_faults: bool = False  # tests only: honour the X-Trioserve-Test-Fault header
    ui: bool = True  # the web playground at / (off: --no-ui, TRIOSERVE_UI=0)
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerConfig:
        """Read ``TRIOSERVE_<FIELD>`` variables (e.g. TRIOSERVE_PARALLEL=4)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"TRIOSERVE_{f.name.upper()}")
            if raw is None or f.name == "extra":
                continue
            values[f.name] = _parse(f.name, raw)
        return cls(**values)


def truthy(raw: str | None) -> bool:
    """An on/off setting from an environment variable or header: 1, true, yes or on, any case."""
    return (raw or "").strip().lower() in {"1", "true", "yes", "on"}


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
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw
