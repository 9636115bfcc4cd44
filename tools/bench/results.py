"""Every figure of a benchmark run, per server, and what each run saw.

``values[server][key]`` lists one figure per repeat (``None`` where a run failed or did not
go as planned); ``prompt_sizes`` the prompt tokens the servers reported for it; ``details``
one entry per scenario run, with each stream's counts, times and error. All three go to
``--json`` as they are.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from .client import StreamResult


class Named(Protocol):
    name: str


class Results:
    def __init__(self, names: list[str]) -> None:
        self.values: dict[str, dict[str, list[float | None]]] = {n: {} for n in names}
        self.prompt_sizes: dict[str, dict[str, list[int]]] = {n: {} for n in names}
        self.details: list[dict[str, Any]] = []

    def record(self, server: Named, key: str, value: float | None, prompt: int | None = None):
        self.values[server.name].setdefault(key, []).append(value)
        if prompt is not None:
            self.prompt_sizes[server.name].setdefault(key, []).append(prompt)

    def detail(
        self, server: Named, rep: int, name: str, results: list[StreamResult], **extra: Any
    ) -> None:
        """One scenario run's streams; warns on stderr if one of them failed."""
        self.details.append(
            {
                "server": server.name,
                "rep": rep,
                "scenario": name,
                "streams": [
                    {
                        "prompt_tokens": r.prompt_tokens,
                        "completion_tokens": r.trace.count,
                        "ttft_s": r.trace.ttft,
                        "decode_tps": r.trace.decode_rate(),
                        "finish_reason": r.finish_reason,
                        "error": r.error,
                    }
                    for r in results
                ],
                **extra,
            }
        )
        errors = [r.error for r in results if r.error]
        if errors:
            print(f"  warning: {server.name} {name}: {errors[0]}", file=sys.stderr)

    def last_tokens(self) -> str:
        """The token counts of the last run's streams, for the progress line."""
        counts = [s["completion_tokens"] for s in self.details[-1]["streams"]]
        return f"tokens {counts}"
