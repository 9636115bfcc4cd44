"""Shared fixtures: the embedded model, converted once per machine into the user cache."""

from __future__ import annotations

from pathlib import Path

import pytest

# Load the fast BLAS before anything imports mlx (see trioserve/blas.py).
import trioserve  # noqa: F401  # isort: skip


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from trioserve.models.registry import resolve_model

    return resolve_model(None)
