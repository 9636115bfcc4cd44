"""The limit with no HTTP: raw mlx-lm ``stream_generate`` and ``BatchGenerator`` at 8, on the
same weights and prefill step, through ``tools/bench_engine.py`` in a child process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_common import ROOT

from .servers import blas_env


def measure_limits(args: argparse.Namespace, model_dir: Path, out: Path) -> dict | None:
    """Decode tok/s per repeat, or None (with a warning) if the child failed."""
    env = {**os.environ, **blas_env(args)}
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench_engine.py"),
        "--limits-only",
        "--max-tokens",
        str(args.max_tokens),
        "--repeat",
        str(args.repeat),
        "--prefill-step-size",
        str(args.prefill_step_size),
        "--model",
        str(model_dir),
        "--json",
        str(out),
    ]
    print("in-process limits (no HTTP): " + " ".join(cmd[1:]), file=sys.stderr)
    try:
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"  warning: in-process limits failed: {exc}", file=sys.stderr)
        return None
    runs = json.loads(out.read_text())["runs"]
    return {
        "stream_generate_tps": [r["decode_tps"] for r in runs["stream_generate"]],
        "batch_generator_8_tps": [r["aggregate_tps"] for r in runs["batch_generator_8"]],
    }
