"""MLX must run its matmuls on a fast BLAS, not on the bundled reference BLAS, and a BLAS
that cannot run on this CPU must be skipped, never crash the process."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trioserve  # noqa: F401  (preloads the fast BLAS)
from trioserve import blas
from trioserve.blas import (
    BlasReport,
    ProbeResult,
    blas_report,
    choose_blas,
    log_blas_report,
    preload_fast_blas,
    probe_library,
    run_probe,
    symbol_library,
)

ROOT = Path(__file__).resolve().parents[2]
# Every BLAS/LAPACK symbol libmlx.so imports (`nm -D --undefined-only libmlx.so`).
MLX_IMPORTS = ["cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "sgesdd_", "sgetrf_", "ssyevd_"]


def test_mlx_binds_to_the_preloaded_blas():
    loaded = blas.loaded_library()
    report = blas_report()
    assert loaded is not None, report
    assert not report.is_reference, report
    # What the dynamic linker hands libmlx.so (the global scope) is the code of the library
    # trioserve loaded (for the shim: the scipy-openblas32 functions it forwards to).
    handle = ctypes.CDLL(loaded, mode=os.RTLD_NOLOAD)._handle
    for symbol in MLX_IMPORTS:
        own = symbol_library(symbol, handle)
        assert own is not None and "openblas" in Path(own).name, (symbol, own)
        assert symbol_library(symbol) == own, symbol
    assert report.library == symbol_library("cblas_sgemm", handle), report


def test_matmul_and_linalg_results_are_right():
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((67, 45)).astype(np.float32)
    b = rng.standard_normal((45, 33)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)
    c = (a[:5, :4] + 1j * a[5:10, :4]).astype(np.complex64)
    d = (b[:4, :3] + 1j * b[4:8, :3]).astype(np.complex64)
    np.testing.assert_allclose(np.array(mx.array(c) @ mx.array(d)), c @ d, rtol=1e-4, atol=1e-4)
    spd = a[:8, :8] @ a[:8, :8].T + 8 * np.eye(8, dtype=np.float32)  # LAPACK, via the BLAS
    with mx.stream(mx.cpu):
        inv = mx.linalg.inv(mx.array(spd))
        u, s, vt = mx.linalg.svd(mx.array(spd))
        mx.eval(inv, u, s, vt)
    np.testing.assert_allclose(np.array(inv) @ spd, np.eye(8), atol=1e-4)
    np.testing.assert_allclose((np.array(u) * np.array(s)) @ np.array(vt), spd, atol=1e-3)


def test_preload_is_idempotent():
    assert preload_fast_blas() == preload_fast_blas()


def _report_in_subprocess(prelude: str = "", **env: str) -> dict:
    """blas_report() of a fresh interpreter that runs `prelude`, then imports trioserve."""
    code = (
        f"{prelude}\n"
        "import dataclasses, json, trioserve\n"
        "from trioserve.blas import blas_report\n"
        "print(json.dumps(dataclasses.asdict(blas_report())))\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k != "TRIOSERVE_NO_BLAS_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean_env, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reference_blas_is_reported_when_preload_disabled():
    report = _report_in_subprocess(TRIOSERVE_NO_BLAS_PRELOAD="1")
    assert report["is_reference"], report
    assert "mlx_cpu.libs" in report["library"], report
    assert "TRIOSERVE_NO_BLAS_PRELOAD" in report["reason"], report


@pytest.mark.parametrize("value", ["false", "0", "off", ""])
def test_preload_is_not_disabled_by_a_false_setting(value):
    report = _report_in_subprocess(TRIOSERVE_NO_BLAS_PRELOAD=value)
    assert not report["is_reference"], report


def test_missing_libgfortran_is_reported_not_raised():
    # Simulate a load failure in this process after the probe passed (libgfortran.so.5 gone).
    prelude = (
        "import ctypes\n"
        "real = ctypes.CDLL\n"
        "def fake(name, *a, **k):\n"
        "    if name and 'openblas' in str(name):\n"
        "        raise OSError('libgfortran.so.5: cannot open shared object file')\n"
        "    return real(name, *a, **k)\n"
        "ctypes.CDLL = fake\n"
    )
    report = _report_in_subprocess(prelude)
    assert report["is_reference"], report
    assert "libgfortran" in report["reason"], report


def test_mlx_imported_first_is_reported():
    report = _report_in_subprocess("import mlx.core")
    assert report["is_reference"], report
    assert "imported before trioserve" in report["reason"], report


# --- the probe: a library that cannot run here is a verdict, not a crash -------------------


@pytest.fixture(scope="module")
def trapping_blas(tmp_path_factory) -> Path:
    """A BLAS whose cblas_* execute an illegal instruction, like an AVX-512 build on a CPU
    without AVX-512 (ud2 on x86_64: SIGILL)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler to build the trapping library")
    tmp = tmp_path_factory.mktemp("trap")
    src = tmp / "trap.c"
    src.write_text("".join(f"void cblas_{n}gemm(void) {{ __builtin_trap(); }}\n" for n in "sdc"))
    lib = tmp / "libopenblas_trap.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def _expected_signal() -> str:
    return "SIGILL" if platform.machine() in ("x86_64", "AMD64") else "probe crashed with"


def test_probe_of_a_crashing_library_says_so(trapping_blas):
    result = probe_library(trapping_blas, use_cache=False)
    assert not result.ok and result.cacheable, result
    assert _expected_signal() in result.error, result


def test_probe_of_the_loaded_library_passes():
    loaded = blas.loaded_library()
    assert loaded is not None, blas_report()
    result = probe_library(Path(loaded), use_cache=False)
    assert result.ok and result.gflops > 0, result


def test_crashing_candidate_is_skipped_in_a_real_start(trapping_blas, tmp_path):
    # A fresh interpreter whose cmeel-openblas is the trapping library: it must start, skip
    # it with the reason, and still load the next candidate (the shim) if there is one.
    prelude = (
        "import os\n"
        "from pathlib import Path\n"
        "os.environ['TRIOSERVE_NO_BLAS_PRELOAD'] = '1'\n"
        "import trioserve.blas as b\n"
        "del os.environ['TRIOSERVE_NO_BLAS_PRELOAD']\n"
        "b._reason = None\n"
        f"b.find_cmeel_openblas = lambda: Path({str(trapping_blas)!r})\n"
        "b.preload_fast_blas()\n"
    )
    report = _report_in_subprocess(prelude, XDG_CACHE_HOME=str(tmp_path))
    assert str(trapping_blas) in report["reason"], report
    assert _expected_signal() in report["reason"], report
    if blas.shim_path().is_file():
        assert not report["is_reference"], report


def test_run_probe_reports_a_crash_a_failure_and_a_timeout():
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    crash = run_probe([sys.executable, "-c", kill])
    assert not crash.ok and "SIGILL" in crash.error and crash.cacheable, crash

    fail = "raise OSError('libgfortran.so.5: cannot open shared object file')"
    failed = run_probe([sys.executable, "-c", fail])
    # Not remembered: the missing library may be installed later.
    assert not failed.ok and "libgfortran.so.5" in failed.error and not failed.cacheable, failed

    garbage = run_probe([sys.executable, "-c", "print('not json')"])
    assert not garbage.ok, garbage

    hang = run_probe([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert not hang.ok and "timed out" in hang.error and not hang.cacheable, hang

    fine = run_probe([sys.executable, "-c", "print('{\"gflops\": 123.0}')"])
    assert fine == ProbeResult(ok=True, gflops=123.0), fine


def test_probe_verdicts_are_cached_by_file_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def fake_run(argv, timeout_s=30.0):
        calls.append(argv)
        return ProbeResult(ok=False, error="probe crashed with SIGILL")

    monkeypatch.setattr(blas, "run_probe", fake_run)
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"x")
    first = probe_library(lib)
    assert probe_library(lib) == first and len(calls) == 1
    os.utime(lib, ns=(1, 1))  # a reinstalled library is probed again
    probe_library(lib)
    assert len(calls) == 2
    monkeypatch.setattr(blas, "_cpu_signature", lambda: "another CPU")
    probe_library(lib)
    assert len(calls) == 3
    # A timeout may just be a busy machine: not remembered.
    monkeypatch.setattr(
        blas, "run_probe", lambda argv, timeout_s=30.0: ProbeResult(False, None, "t", False)
    )
    other = tmp_path / "libother.so"
    other.write_bytes(b"y")
    probe_library(other)
    cached = json.loads((tmp_path / "cache" / "trioserve" / "blas-probe.json").read_text())
    assert len(cached) == 3, cached


def test_choose_blas_takes_the_fastest_library_that_runs():
    verdicts = {
        Path("/crash.so"): ProbeResult(ok=False, error="probe crashed with SIGILL"),
        Path("/slow.so"): ProbeResult(ok=True, gflops=50.0),
        Path("/fast.so"): ProbeResult(ok=True, gflops=150.0),
    }
    candidates = [("crash", Path("/crash.so")), ("slow", Path("/slow.so"))]
    chosen, notes = choose_blas(candidates, probe=verdicts.__getitem__)
    assert chosen == ("slow", Path("/slow.so"))
    assert len(notes) == 1 and "SIGILL" in notes[0] and "/crash.so" in notes[0]

    chosen, notes = choose_blas(
        [("slow", Path("/slow.so")), ("fast", Path("/fast.so"))], probe=verdicts.__getitem__
    )
    assert chosen == ("fast", Path("/fast.so")) and "slower" in notes[0]

    chosen, notes = choose_blas([("crash", Path("/crash.so"))], probe=verdicts.__getitem__)
    assert chosen is None and "SIGILL" in notes[0]


# --- logging -----------------------------------------------------------------------------


def test_reference_blas_logs_a_loud_warning(caplog):
    slow = BlasReport(library="libblas.so.3", gflops=6.0, is_reference=True, reason="test")
    with caplog.at_level(logging.INFO):
        log_blas_report(logging.getLogger("test"), slow)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "30x slower" in warning[0].getMessage()
    assert "tools/bootstrap.sh" in warning[0].getMessage()


def test_fast_blas_logs_one_info_line(caplog):
    fast = BlasReport(library="libopenblas.so.0", gflops=200.0, is_reference=False)
    with caplog.at_level(logging.INFO):
        log_blas_report(logging.getLogger("test"), fast)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "libopenblas.so.0" in caplog.records[0].getMessage()


def test_skipped_candidate_is_in_the_info_line(caplog):
    fast = BlasReport(
        library="libscipy_openblas.so",
        gflops=90.0,
        is_reference=False,
        reason="skipped cmeel-openblas: probe crashed with SIGILL",
    )
    with caplog.at_level(logging.INFO):
        log_blas_report(logging.getLogger("test"), fast)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "SIGILL" in caplog.records[0].getMessage()
