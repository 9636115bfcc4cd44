"""Make MLX use a fast BLAS on Linux, and report which BLAS it really uses.

Why: MLX's Linux CPU wheel links a reference (netlib) BLAS that runs float32 GEMM at
~6 GFLOP/s, which makes decoding ~30x slower than it should be. Loading OpenBLAS from the
`cmeel-openblas` package with RTLD_GLOBAL *before* the first `import mlx` makes the dynamic
linker bind MLX's `cblas_*` calls to OpenBLAS (~200 GFLOP/s). This module does that load,
and measures afterwards which library won, so a slow setup is reported loudly instead of
silently serving at a crawl.

Import-light on purpose: it must run before anything imports mlx.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NO_PRELOAD_ENV = "TRIOSERVE_NO_BLAS_PRELOAD"
_OPENBLAS_PACKAGE = "cmeel-openblas"
_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so")
# A fast BLAS does >100 GFLOP/s on the probe GEMM; the reference one ~6.
_REFERENCE_GFLOPS_MAX = 20.0
# The probe GEMM: one step of SmolLM2's MLP at a prefill of 328 tokens.
_PROBE_SHAPE = (328, 576, 1536)
_FIX_HINT = (
    "install the system library libgfortran5 (e.g. `apt-get install libgfortran5`) and the "
    "PyPI package cmeel-openblas (`pip install cmeel-openblas`), and import trioserve before mlx"
)

_loaded_path: str | None = None
_reason: str | None = None


@dataclass(frozen=True)
class BlasReport:
    """Which BLAS MLX's matmuls go to, and how fast they are."""

    library: str
    gflops: float | None
    is_reference: bool
    reason: str | None = None


def _find_openblas() -> Path | None:
    """Locate libopenblas from the cmeel-openblas distribution, or None."""
    try:
        dist = importlib.metadata.distribution(_OPENBLAS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = []
    for name in _OPENBLAS_NAMES:
        candidates += [f for f in dist.files or () if f.name == name and "lib" in f.parts]
        candidates.append(Path("cmeel.prefix") / "lib" / name)
    for rel in candidates:
        path = Path(str(dist.locate_file(rel)))
        if path.is_file():
            return path
    return None


def preload_fast_blas() -> str | None:
    """Load OpenBLAS globally so MLX binds to it; return its path, or None if not applicable.

    Linux only; must run before the first `import mlx`. Idempotent, and never raises: the
    reason it did nothing is kept for `blas_report()`.
    """
    global _loaded_path, _reason
    if _loaded_path is not None or _reason is not None:
        return _loaded_path
    try:
        if not sys.platform.startswith("linux"):
            _reason = f"not needed on {sys.platform}"
        elif os.environ.get(NO_PRELOAD_ENV, "").strip() not in ("", "0"):
            _reason = f"disabled by {NO_PRELOAD_ENV}"
        elif "mlx" in sys.modules or "mlx.core" in sys.modules:
            _reason = "mlx was imported before trioserve, too late to load OpenBLAS"
        else:
            path = _find_openblas()
            if path is None:
                _reason = f"the {_OPENBLAS_PACKAGE} package (libopenblas) is not installed"
            else:
                # One BLAS thread unless the user says otherwise: with two, OpenBLAS's
                # spin-waiting collapsed when the cores were shared (measured here: four
                # 666-token prompts took 150 s instead of 17 s while other work ran), and a
                # server always shares them with its own HTTP thread.
                os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                _loaded_path = str(path)
    except OSError as exc:  # typically: libgfortran.so.5: cannot open shared object file
        _reason = f"cannot load OpenBLAS: {exc}"
    except Exception as exc:  # never let a speed-up break startup
        _reason = f"cannot load OpenBLAS: {type(exc).__name__}: {exc}"
    return _loaded_path


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _cblas_sgemm_library() -> str | None:
    """The file that MLX's `cblas_sgemm` resolves to, as the dynamic linker would bind it.

    The global scope (RTLD_GLOBAL libraries) comes first; failing that, libmlx's own
    dependencies (the bundled reference BLAS).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.dlsym.restype = ctypes.c_void_p
        libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        addr = libc.dlsym(None, b"cblas_sgemm")  # NULL handle == RTLD_DEFAULT
        if not addr:
            import mlx.core as mx

            libmlx = Path(mx.__file__).parent / "lib" / "libmlx.so"
            handle = ctypes.CDLL(str(libmlx), mode=os.RTLD_NOLOAD)._handle
            addr = libc.dlsym(handle, b"cblas_sgemm")
        info = _DlInfo()
        if addr and libc.dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except Exception:
        pass
    return None


def _measure_gflops(reps: int = 5) -> float:
    """Median float32 GEMM throughput of MLX over `reps` runs, after a warm-up."""
    import mlx.core as mx

    m, k, n = _PROBE_SHAPE
    a = mx.random.normal((m, k))
    b = mx.random.normal((k, n))
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / sorted(times)[len(times) // 2] / 1e9


def blas_report() -> BlasReport:
    """Find which library MLX's `cblas_sgemm` is, and measure GEMM GFLOP/s (imports mlx)."""
    if sys.platform == "darwin":
        return BlasReport(library="Accelerate/Metal", gflops=None, is_reference=False)
    library = _cblas_sgemm_library() or "unknown"
    gflops = _measure_gflops()
    # Trust the library's identity; the timing decides only when the library is unknown
    # (a busy machine can slow OpenBLAS down a lot).
    if "openblas" in library.lower():
        is_reference = False
    elif "mlx_cpu.libs" in library or "libblas" in Path(library).name:
        is_reference = True
    else:
        is_reference = gflops < _REFERENCE_GFLOPS_MAX
    reason = _reason
    if is_reference and reason is None:
        reason = "OpenBLAS was loaded but MLX does not use it"
    return BlasReport(
        library=library,
        gflops=gflops,
        is_reference=is_reference,
        reason=reason if is_reference else None,
    )


def log_blas_report(logger: logging.Logger, report: BlasReport | None = None) -> BlasReport:
    """Log which BLAS is active: one INFO line, or a loud WARNING for the reference BLAS."""
    report = report or blas_report()
    speed = "n/a" if report.gflops is None else f"{report.gflops:.0f} GFLOP/s"
    logger.info("BLAS: %s (%s float32 GEMM)", report.library, speed)
    if report.is_reference:
        logger.warning(
            "MLX is using the slow reference BLAS (%s, %s): decoding will be ~30x slower.\n"
            "  reason: %s\n"
            "  fix: %s.",
            report.library,
            speed,
            report.reason,
            _FIX_HINT,
        )
    return report
