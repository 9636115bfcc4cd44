"""``--plot``: aggregate tok/s against concurrency, and TTFT against prompt length (issue 8
§3), medians per server, as a PNG (needs matplotlib)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_common import machine_line

from trioserve.testing import ServerProcess

from .report import median_prompt, summary
from .results import Results
from .workloads import CONCURRENCY

COLORS = {"trioserve": "tab:blue", "peer": "tab:orange", "llama-server": "tab:green"}
LABELS = {"trioserve": "trioserve", "peer": "mlx_lm.server", "llama-server": "llama-server (GGUF)"}


def plot(
    results: Results,
    servers: list[ServerProcess],
    args: argparse.Namespace,
    out: Path,
    machine: str | None = None,
) -> None:
    """Throughput and TTFT per server; ``machine`` is the run's machine line (default: now)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot needs matplotlib: `.venv/bin/pip install matplotlib`; no plot written.",
            file=sys.stderr,
        )
        return
    table = summary(results, args)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in servers:
        color, label = COLORS[s.name], LABELS[s.name]
        for kind, style in (("greedy", "-"), ("seeded", "--")):
            xs, ys = [], []
            for n in CONCURRENCY:
                value = table[s.name][f"agg_{kind}_tps_{n}"]["median"]
                if value is not None:
                    xs.append(n)
                    ys.append(value)
            ax1.plot(xs, ys, style, marker="o", color=color, label=f"{label}, {kind}")
        keys = ["ttft_short_s"] + [f"ttft_{t}_s" for t in args.ttft_lengths]
        pts = []
        for key in keys:
            size = median_prompt(results, s.name, key)
            value = table[s.name][key]["median"]
            if size is not None and value is not None:
                pts.append((size, value))
        if pts:
            ax2.plot(*zip(*sorted(pts), strict=True), marker="o", color=color, label=label)
    ax1.set(
        xlabel="concurrent streams",
        ylabel="aggregate decode tokens/s",
        title="Throughput",
        xticks=list(CONCURRENCY),
    )
    ax2.set(xlabel="prompt tokens", ylabel="time to first token (s)", title="Time to first token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    weights = "float32 (llama-server: the GGUF as it is)" if args.llama_server else "float32"
    fig.suptitle(
        f"SmolLM2-135M {weights}, median of {args.repeat}; {machine or machine_line()}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot written to {out}", file=sys.stderr)
