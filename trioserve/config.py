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
    prefill_step_size: int = 512
    max_tokens: int = 2048  # default cap when a request names none
    cors_origins: tuple[str, ...] = ()
    api_key: str | None = None
    heartbeat_interval_s: float = 2.0
    sse_keepalive_s: float = 0.0  # 0: no SSE comment lines at all (strict by default)
    max_body_bytes: int = 8 * 1024 * 1024
    default_temperature: float = 1.0
    log_level: str = "info"
    served_model_name: str | None = None
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


def _parse(name: str, raw: str) -> object:
    if name == "model":
        return Path(raw) if raw else None
    if name == "cors_origins":
        return tuple(o for o in raw.replace(",", " ").split() if o)
    if name in {"port", "parallel", "prefill_step_size", "max_tokens", "max_body_bytes"}:
        return int(raw)
    if name in {"heartbeat_interval_s", "sse_keepalive_s", "default_temperature"}:
        return float(raw)
    return raw or None if name in {"api_key", "served_model_name"} else raw
