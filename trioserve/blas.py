"""Make MLX use a fast BLAS on Linux, and report which BLAS it really uses.

Why: MLX's Linux CPU wheel links a reference (netlib) BLAS that runs float32 GEMM at
~6 GFLOP/s, which makes decoding ~30x slower than it should be. Loading an OpenBLAS with
RTLD_GLOBAL *before* the first `import mlx` makes the dynamic linker bind MLX's `cblas_*`
(and LAPACK) calls to it (~100-200 GFLOP/s). Two candidates, both PyPI packages:

- `cmeel-openblas`: `libopenblas.so.0` with the plain names, but built for one CPU family
  (SkylakeX in 0.3.31): on a CPU without AVX-512 its first GEMM dies with SIGILL.
- `scipy-openblas32`: built for every CPU (DYNAMIC_ARCH), but its names are prefixed
  (`scipy_cblas_sgemm`); tools/build_blas_shim.sh compiles tools/cblas_shim.c into a small
  library that exports the plain names MLX imports and forwards them to it.

A library that cannot run here would kill the whole process, and only at the first matmul,
so each candidate is first *probed* in a subprocess (load it, run and check small and
model-sized GEMMs, time one). The verdict is cached in the user cache dir, keyed by the
library file and the CPU, so a normal start costs a file read. Of the candidates that pass,
the fastest is loaded. Afterwards `blas_report()` measures which library won, so a slow setup
is reported loudly instead of silently serving at a crawl, with the reason.

Import-light on purpose: it must run before anything imports mlx.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trioserve.config import truthy

NO_PRELOAD_ENV = "TRIOSERVE_NO_BLAS_PRELOAD"
_CMEEL_PACKAGE = "cmeel-openblas"
_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so")
# Built by tools/build_blas_shim.sh into the environment trioserve is installed in.
SHIM_NAME = "libtrioserve_openblas.so"
# A fast BLAS does >90 GFLOP/s on the probe GEMM on one core; the reference one ~6.
_REFERENCE_GFLOPS_MAX = 20.0
# The probe GEMM: one step of SmolLM2's MLP at a prefill of 328 tokens.
_PROBE_SHAPE = (328, 576, 1536)
# A loaded 2-core machine runs the probe in ~0.1-0.3 s; past this, something is wrong.
_PROBE_TIMEOUT_S = 30.0
# Bump when the probe changes, so that cached verdicts are redone.
_PROBE_VERSION = 1
_FIX_HINT = (
    "run tools/bootstrap.sh: it installs scipy-openblas32 and builds its shim for MLX with gcc "
    "(tools/build_blas_shim.sh), and libgfortran5 for cmeel-openblas; import trioserve before "
    "mlx"
)

_loaded_path: str | None = None
# OPENBLAS_NUM_THREADS as the user set it before trioserve was imported (None: unset).
_user_threads: str | None = os.environ.get("OPENBLAS_NUM_THREADS")
_loaded_label: str | None = None
_reason: str | None = None  # why no fast BLAS was loaded
_skipped: list[str] = []  # candidates that were passed over, and why


@dataclass(frozen=True)
class BlasReport:
    """Which BLAS MLX's matmuls go to, and how fast they are.

    `reason`: with the reference BLAS, why no fast one is used; otherwise the candidates that
    were skipped and why (e.g. cmeel-openblas crashing on this CPU), or None.
    """

    library: str
    gflops: float | None
    is_reference: bool
    reason: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What the probe subprocess found out about one library."""

    ok: bool
    gflops: float | None = None
    error: str | None = None
    # Crashes and passes are remembered; a timeout (a busy machine?) or a load failure is not.
    cacheable: bool = True


def find_cmeel_openblas() -> Path | None:
    """Locate libopenblas from the cmeel-openblas distribution, or None."""
    try:
        dist = importlib.metadata.distribution(_CMEEL_PACKAGE)
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


def shim_path() -> Path:
    """Where tools/build_blas_shim.sh puts the scipy-openblas32 shim (it may be absent)."""
    return Path(sys.prefix) / "lib" / "trioserve" / SHIM_NAME


# Runs in a fresh `python -I -S`: load the library, check cblas_sgemm/dgemm/cgemm results
# exactly (small integers, so float32 sums are exact), including a model-sized sgemm whose
# kernels are the ones MLX will run, then time that one. A CPU that lacks an instruction the
# library uses kills this process (SIGILL), not the caller.
_PROBE_CODE = r"""
import ctypes, json, sys, time
from array import array

lib = ctypes.CDLL(sys.argv[1])
M, K, N = (int(x) for x in sys.argv[2:5])
ROW, NT = 101, 111  # CblasRowMajor, CblasNoTrans
I, P = ctypes.c_int, ctypes.c_void_p


def buf(arr):
    return ctypes.cast(arr.buffer_info()[0], P)


def pattern(code, count, period, shift):
    one = array(code, [float(i % period - shift) for i in range(period)])
    return (one * (count // period + 1))[:count]


def gemm(fn, code, scalar, m, k, n):
    a, b = pattern(code, m * k, 7, 3), pattern(code, k * n, 5, 2)
    c = array(code, [float("nan")]) * (m * n)  # beta == 0: C must not be read
    fn(ROW, NT, NT, m, n, k, scalar(1.0), buf(a), k, buf(b), n, scalar(0.0), buf(c), n)
    return a, b, c, lambda: fn(ROW, NT, NT, m, n, k, scalar(1.0), buf(a), k, buf(b), n,
                               scalar(0.0), buf(c), n)


def check(name, a, b, c, m, k, n, cells):
    for i, j in cells:
        want = sum(a[i * k + x] * b[x * n + j] for x in range(k))
        if c[i * n + j] != want:
            sys.exit(f"wrong {name} result at ({i}, {j}): {c[i * n + j]} != {want}")


for name, code, ctype in (("sgemm", "f", ctypes.c_float), ("dgemm", "d", ctypes.c_double)):
    fn = getattr(lib, "cblas_" + name)
    fn.restype = None
    fn.argtypes = [I] * 6 + [ctype, P, I, P, I, ctype, P, I]
    a, b, c, _ = gemm(fn, code, ctype, 13, 17, 11)
    check(name, a, b, c, 13, 17, 11, [(i, j) for i in range(13) for j in range(11)])

cgemm = lib.cblas_cgemm
cgemm.restype = None
cgemm.argtypes = [I] * 6 + [P, P, I, P, I, P, P, I]
one, zero = (ctypes.c_float * 2)(1.0, 0.0), (ctypes.c_float * 2)(0.0, 0.0)
a = array("f", [1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0])  # 2x2, interleaved re/im
b = array("f", [2.0, -1.0, 1.0, 1.0, -3.0, 0.0, 0.5, 2.0])
c = array("f", [float("nan")]) * 8
cgemm(ROW, NT, NT, 2, 2, 2, one, buf(a), 2, buf(b), 2, zero, buf(c), 2)
ca = [complex(a[i], a[i + 1]) for i in range(0, 8, 2)]
cb = [complex(b[i], b[i + 1]) for i in range(0, 8, 2)]
for i in range(2):
    for j in range(2):
        want = ca[2 * i] * cb[j] + ca[2 * i + 1] * cb[2 + j]
        if complex(c[4 * i + 2 * j], c[4 * i + 2 * j + 1]) != want:
            sys.exit(f"wrong cgemm result at ({i}, {j})")

a, b, c, run = gemm(lib.cblas_sgemm, "f", ctypes.c_float, M, K, N)
check("sgemm", a, b, c, M, K, N, [(0, 0), (M - 1, N - 1), (M // 2, N // 3), (7, N - 5)])
times = []
for _ in range(3):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps({"gflops": 2.0 * M * K * N / sorted(times)[1] / 1e9}))
"""


def _probe_argv(path: Path) -> list[str]:
    m, k, n = _PROBE_SHAPE
    return [sys.executable, "-I", "-S", "-c", _PROBE_CODE, str(path), str(m), str(k), str(n)]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_probe(argv: list[str], timeout_s: float = _PROBE_TIMEOUT_S) -> ProbeResult:
    """Run a probe command; its crash, failure or wrong output is a verdict, never raised."""
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(
            ok=False, error=f"probe timed out after {timeout_s:.0f} s", cacheable=False
        )
    except OSError as exc:
        return ProbeResult(ok=False, error=f"cannot run the probe: {exc}", cacheable=False)
    if out.returncode < 0:
        name = _signal_name(-out.returncode)
        why = " (an instruction this CPU lacks: built for a newer CPU)" if name == "SIGILL" else ""
        return ProbeResult(ok=False, error=f"probe crashed with {name}{why}")
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            gflops = float(json.loads(lines[-1])["gflops"])
        except (ValueError, KeyError, TypeError):
            pass
        else:
            return ProbeResult(ok=True, gflops=gflops)
    # Not cached: a missing dependency (libgfortran.so.5) may be installed later.
    detail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    error = f"probe failed (exit {out.returncode}): {detail}"
    return ProbeResult(ok=False, error=error, cacheable=False)


def _cpu_signature() -> str:
    """The first CPU's identity and feature flags (what decides which kernels can run)."""
    keys = ("vendor_id", "model name", "flags", "cpu implementer", "cpu part", "features")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            block = f.read(1 << 16).split("\n\n", 1)[0]
    except OSError:
        block = ""
    lines = [ln for ln in block.splitlines() if ln.split(":", 1)[0].strip().lower() in keys]
    return "\n".join(lines) or os.uname().machine


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trioserve" / "blas-probe.json"


def _cache_key(path: Path) -> str:
    st = path.stat()
    # The shim's code is scipy-openblas32's, which pip may upgrade without rebuilding it.
    forwards_to = ""
    if path.name == SHIM_NAME:
        try:
            forwards_to = importlib.metadata.version("scipy-openblas32")
        except importlib.metadata.PackageNotFoundError:
            pass
    parts = [
        _PROBE_VERSION,
        os.path.realpath(path),
        st.st_mtime_ns,
        st.st_size,
        forwards_to,
        _cpu_signature(),
        os.environ.get("OPENBLAS_CORETYPE", ""),
        os.environ.get("OPENBLAS_NUM_THREADS", ""),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def probe_library(path: Path, use_cache: bool = True) -> ProbeResult:
    """Whether the BLAS at `path` runs correctly on this CPU, and its GFLOP/s (subprocess)."""
    key = None
    cache: dict = {}
    if use_cache:
        try:
            key = _cache_key(path)
            cache = json.loads(_cache_file().read_text())
            hit = cache.get(key)
            if isinstance(hit, dict):
                return ProbeResult(ok=bool(hit["ok"]), gflops=hit["gflops"], error=hit["error"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cache = cache if isinstance(cache, dict) else {}
    if not sys.executable:
        return ProbeResult(ok=False, error="no Python executable to run the probe", cacheable=False)
    result = run_probe(_probe_argv(path))
    if key is not None and result.cacheable:
        entries = [(k, v) for k, v in cache.items() if k != key][-31:]
        entries.append((key, {"ok": result.ok, "gflops": result.gflops, "error": result.error}))
        target = _cache_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dict(entries), indent=1))
            os.replace(tmp, target)
        except OSError:
            pass  # a read-only home: probe again next time
    return result


def _candidates() -> tuple[list[tuple[str, Path]], list[str]]:
    """The fast BLAS libraries present, best-known first, and notes on the missing ones."""
    found, missing = [], []
    cmeel = find_cmeel_openblas()
    if cmeel is None:
        missing.append(f"{_CMEEL_PACKAGE}: not installed")
    else:
        found.append((_CMEEL_PACKAGE, cmeel))
    shim = shim_path()
    if shim.is_file():
        found.append(("scipy-openblas32 (trioserve shim)", shim))
    else:
        missing.append(f"scipy-openblas32: its shim {shim} is not built")
    return found, missing


def choose_blas(
    candidates: list[tuple[str, Path]], probe=probe_library
) -> tuple[tuple[str, Path] | None, list[str]]:
    """The candidate whose probe passes with the most GFLOP/s (ties: the first one), and why
    each other one was skipped."""
    best, best_gflops, notes, passed = None, -1.0, [], []
    for label, path in candidates:
        result = probe(path)
        if not result.ok:
            notes.append(f"{label} ({path}): {result.error}")
            continue
        passed.append((label, path, result.gflops or 0.0))
        if (result.gflops or 0.0) > best_gflops:
            best, best_gflops = (label, path), result.gflops or 0.0
    for label, path, gflops in passed:
        if (label, path) != best:
            notes.append(f"{label}: slower here ({gflops:.0f} vs {best_gflops:.0f} GFLOP/s)")
    return best, notes


def preload_fast_blas() -> str | None:
    """Load the fastest BLAS that runs on this CPU globally, so MLX binds to it; return its
    path, or None if not applicable.

    Linux only; must run before the first `import mlx`. Idempotent, and never raises: the
    reason it did nothing (or skipped a candidate) is kept for `blas_report()`.
    """
    global _loaded_path, _loaded_label, _reason
    if _loaded_path is not None or _reason is not None:
        return _loaded_path
    try:
        if not sys.platform.startswith("linux"):
            _reason = f"not needed on {sys.platform}"
        elif truthy(os.environ.get(NO_PRELOAD_ENV)):
            _reason = f"disabled by {NO_PRELOAD_ENV}"
        elif "mlx" in sys.modules or "mlx.core" in sys.modules:
            _reason = "mlx was imported before trioserve, too late to load OpenBLAS"
        else:
            # OpenBLAS starts with one thread unless the user says otherwise: with two,
            # its spin-waiting collapsed when the cores were shared (measured here: four
            # 666-token prompts took 150 s instead of 17 s while other work ran); the
            # engine adds threads at run time while cores are free (--blas-threads,
            # engine/blas_threads.py). Both candidates read this variable at load
            # (scipy-openblas32 keeps OpenBLAS's names); set before the probe, so that it
            # measures what will run, and taken away after the load, so that child
            # processes (another server, a benchmark's peer) do not take it for the user's.
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            found, missing = _candidates()
            chosen, notes = choose_blas(found)
            if chosen is None:
                _reason = "no fast BLAS can run here: " + "; ".join(notes + missing)
            else:
                label, path = chosen
                _skipped.extend(notes)
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:  # the probe passed, so unlikely
                    _reason = f"cannot load {label}: {exc}"
                else:
                    _loaded_path, _loaded_label = str(path), label
    except Exception as exc:  # never let a speed-up break startup
        _reason = f"cannot load OpenBLAS: {type(exc).__name__}: {exc}"
    finally:
        if _user_threads is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
    return _loaded_path


def user_thread_count() -> str | None:
    """OPENBLAS_NUM_THREADS as the user set it before trioserve was imported, or None."""
    return _user_threads


def loaded_library() -> str | None:
    """The path `preload_fast_blas()` loaded (cmeel's libopenblas or the shim), or None."""
    return _loaded_path


# OpenBLAS's run-time thread count, under its own name or scipy-openblas32's prefixed one.
_SET_THREADS_NAMES = ("openblas_set_num_threads", "scipy_openblas_set_num_threads")


def thread_setter() -> Callable[[int], None] | None:
    """The loaded OpenBLAS's ``openblas_set_num_threads``, or None (no fast BLAS loaded).

    Looked up through the loaded file's handle, which also searches what it depends on: the
    shim forwards to scipy-openblas32, whose library exports the prefixed name."""
    if _loaded_path is None:
        return None
    try:
        lib = ctypes.CDLL(_loaded_path)
    except OSError:
        return None
    for name in _SET_THREADS_NAMES:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = None
            fn.argtypes = [ctypes.c_int]
            return fn
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _libdl() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    return libc


def symbol_library(symbol: str, handle: int | None = None) -> str | None:
    """The file whose code `symbol` runs, looked up in `handle` (None: the global scope,
    where the dynamic linker looks first for libmlx's imports). A forwarding (ifunc) symbol
    like the shim's reports the library it forwards to."""
    try:
        libc = _libdl()
        addr = libc.dlsym(handle, symbol.encode())
        info = _DlInfo()
        if addr and libc.dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except Exception:
        pass
    return None


def _cblas_sgemm_library() -> str | None:
    """The file that MLX's `cblas_sgemm` resolves to, as the dynamic linker would bind it.

    The global scope (RTLD_GLOBAL libraries) comes first; failing that, libmlx's own
    dependencies (the bundled reference BLAS).
    """
    found = symbol_library("cblas_sgemm")
    if found is not None:
        return found
    try:
        import mlx.core as mx

        libmlx = Path(mx.__file__).parent / "lib" / "libmlx.so"
        handle = ctypes.CDLL(str(libmlx), mode=os.RTLD_NOLOAD)._handle
    except Exception:
        return None
    return symbol_library("cblas_sgemm", handle)


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
    if is_reference:
        reason = _reason or f"{_loaded_label or 'OpenBLAS'} was loaded but MLX does not use it"
    else:
        reason = "; ".join(f"skipped {note}" for note in _skipped) or None
    return BlasReport(library=library, gflops=gflops, is_reference=is_reference, reason=reason)


def log_blas_report(logger: logging.Logger, report: BlasReport | None = None) -> BlasReport:
    """Log which BLAS is active: one INFO line, or a loud WARNING for the reference BLAS."""
    report = report or blas_report()
    speed = "n/a" if report.gflops is None else f"{report.gflops:.0f} GFLOP/s"
    if report.is_reference:
        logger.info("BLAS: %s (%s float32 GEMM)", report.library, speed)
        logger.warning(
            "MLX is using the slow reference BLAS (%s, %s): decoding will be ~30x slower.\n"
            "  reason: %s\n"
            "  fix: %s.",
            report.library,
            speed,
            report.reason,
            _FIX_HINT,
        )
    elif report.reason:
        logger.info("BLAS: %s (%s float32 GEMM); %s", report.library, speed, report.reason)
    else:
        logger.info("BLAS: %s (%s float32 GEMM)", report.library, speed)
    return report
