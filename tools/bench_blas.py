"""Benchmark float32 GEMM: MLX on its reference BLAS, on each fast BLAS candidate, on what
trioserve chooses, and NumPy.

Why: on Linux the BLAS that MLX binds to decides decode speed (see trioserve/blas.py).
Each MLX variant runs in its own subprocess, because the BLAS is fixed at the first
`import mlx`; a candidate that cannot run on this CPU shows as crashed (e.g. SIGILL).
One BLAS thread (OPENBLAS_NUM_THREADS=1) unless set, as trioserve does.
Usage: `.venv/bin/python tools/bench_blas.py`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (M, K, N): a decode step's MLP, a 328-token prefill's MLP, the tied output head at batch 8.
SHAPES = [(8, 576, 1536), (328, 576, 1536), (8, 576, 49152)]
REPS = 7


def _median_seconds(fn) -> float:
    fn()
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _child(library: str | None) -> None:
    """Run in a subprocess: measure MLX GEMMs and print one JSON line."""
    sys.path.insert(0, str(ROOT))
    if library:  # a forced candidate, loaded as trioserve would (preload is off)
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    import trioserve  # noqa: F401  (preloads the fast BLAS unless disabled)
    from trioserve.blas import blas_report

    report = blas_report()
    # Only after trioserve: the BLAS is bound at the first `import mlx`.
    import mlx.core as mx

    gflops = []
    for m, k, n in SHAPES:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        seconds = _median_seconds(lambda a=a, b=b: mx.eval(a @ b))
        gflops.append(2 * m * k * n / seconds / 1e9)
    print(json.dumps({"library": report.library, "gflops": gflops}))


def _run_mlx(no_preload: bool, library: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("TRIOSERVE_NO_BLAS_PRELOAD", None)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if no_preload:
        env["TRIOSERVE_NO_BLAS_PRELOAD"] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--child", library or ""],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode < 0:
        name = signal.Signals(-out.returncode).name
        return {"library": f"{library} (crashed: {name})", "gflops": []}
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _candidates() -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))
    os.environ["TRIOSERVE_NO_BLAS_PRELOAD"] = "1"  # this process only looks the paths up
    from trioserve.blas import find_cmeel_openblas, shim_path

    found = [("MLX, cmeel-openblas", find_cmeel_openblas())]
    found.append(("MLX, scipy shim", shim_path() if shim_path().is_file() else None))
    return [(name, str(path)) for name, path in found if path is not None]


def _numpy_gflops() -> list[float]:
    import numpy as np

    rng = np.random.default_rng(0)
    result = []
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        result.append(2 * m * k * n / _median_seconds(lambda a=a, b=b: a @ b) / 1e9)
    return result


def main() -> int:
    rows = [("MLX, preload off", _run_mlx(no_preload=True))]
    rows += [(name, _run_mlx(no_preload=True, library=lib)) for name, lib in _candidates()]
    rows += [
        ("MLX, default", _run_mlx(no_preload=False)),
        ("NumPy", {"library": "numpy's bundled OpenBLAS", "gflops": _numpy_gflops()}),
    ]
    headers = [f"{m}x{k}@{k}x{n}" for m, k, n in SHAPES]
    print(f"float32 GEMM, GFLOP/s (median of {REPS}), {os.cpu_count()} CPUs")
    print(f"{'variant':<20}" + "".join(f"{h:>18}" for h in headers) + "  library")
    for name, row in rows:
        cells = "".join(f"{g:>18.1f}" for g in row["gflops"]) or f"{'-':>18}" * len(SHAPES)
        print(f"{name:<20}{cells}  {os.path.basename(row['library'])}")
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child(sys.argv[sys.argv.index("--child") + 1] if len(sys.argv) > 2 else None)
    else:
        raise SystemExit(main())
