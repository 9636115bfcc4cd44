"""MLX must run its matmuls on OpenBLAS, not on the bundled reference BLAS."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import trioserve  # noqa: F401  (preloads OpenBLAS)
from trioserve.blas import BlasReport, blas_report, log_blas_report, preload_fast_blas

ROOT = Path(__file__).resolve().parents[2]


def test_openblas_is_active_in_process():
    report = blas_report()
    assert "openblas" in report.library.lower(), report
    assert not report.is_reference, report
    assert report.gflops is not None and report.gflops > 0, report  # timing: too noisy here


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
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reference_blas_is_reported_when_preload_disabled():
    report = _report_in_subprocess(TRIOSERVE_NO_BLAS_PRELOAD="1")
    assert report["is_reference"], report
    assert "mlx_cpu.libs" in report["library"], report
    assert "TRIOSERVE_NO_BLAS_PRELOAD" in report["reason"], report


def test_missing_libgfortran_is_reported_not_raised():
    # Simulate the load failure seen without the system libgfortran.so.5.
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


def test_reference_blas_logs_a_loud_warning(caplog):
    slow = BlasReport(library="libblas.so.3", gflops=6.0, is_reference=True, reason="test")
    with caplog.at_level(logging.INFO):
        log_blas_report(logging.getLogger("test"), slow)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "30x slower" in warning[0].getMessage()
    assert "cmeel-openblas" in warning[0].getMessage()


def test_fast_blas_logs_one_info_line(caplog):
    fast = BlasReport(library="libopenblas.so.0", gflops=200.0, is_reference=False)
    with caplog.at_level(logging.INFO):
        log_blas_report(logging.getLogger("test"), fast)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "libopenblas.so.0" in caplog.records[0].getMessage()
