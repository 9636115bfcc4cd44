"""The CPU kernels against MLX's own ops and NumPy: same results, no NaN where MLX has none."""

from __future__ import annotations

import numpy as np
import pytest

import trioserve  # noqa: F401  # isort: skip  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from trioserve.engine import cpu_kernels as ck  # noqa: E402
from trioserve.engine.memory import keep_freed_heap  # noqa: E402


def test_fast_exp_matches_numpy_over_the_float32_range():
    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    got = np.array(ck.fast_exp(mx.array(x)), dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-6


def test_fast_exp_saturates_instead_of_overflowing():
    x = mx.array([-mx.inf, -1e30, -200.0, 200.0, 1e30, mx.inf])
    got = np.array(ck.fast_exp(x))
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert np.all(np.isfinite(got[3:])) and np.all(got[3:] > 1e38)


def _qkv(batch: int, length: int, span: int, seed: int = 0):
    kq, kk, kv = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((batch, 9, length, 64), key=kq)
    k = mx.random.normal((batch, 3, span, 64), key=kk)
    v = mx.random.normal((batch, 3, span, 64), key=kv)
    return q, k, v


def _left_padded_causal(length: int, span: int, padding: list[int]) -> mx.array:
    """The shape mlx-lm's BatchKVCache makes: (B, 1, L, S), padded keys masked out."""
    rows = mx.arange(span - length, span)[:, None] >= mx.arange(span)[None]
    pad = mx.array(padding).reshape(-1, 1, 1, 1) <= mx.arange(span)
    return rows & pad


@pytest.mark.parametrize("length", [37, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("mask_kind", ["causal", "none", "bool_batch", "bool_per_head", "additive"])
def test_attention_matches_mlx_sdpa(mask_kind: str, length: int):
    span = 120
    q, k, v = _qkv(2, length, span)
    masks = {
        "causal": "causal",
        "none": None,
        "bool_batch": _left_padded_causal(length, span, [0, 50]),
        "bool_per_head": mx.broadcast_to(
            _left_padded_causal(length, span, [3, 9]), (2, 9, length, span)
        ),
        "additive": mx.where(_left_padded_causal(length, span, [0, 20]), 0.0, -1e9),
    }
    mask = masks[mask_kind]
    ours = ck.attention(q, k, v, 0.125, mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert ours.shape == theirs.shape
    assert mx.allclose(ours, theirs, rtol=1e-4, atol=1e-5).item()


def test_a_fully_masked_row_averages_like_mlx_instead_of_nan():
    # Left padding longer than the chunk: the padded query rows see no key at all.
    length, span = 8, 8
    q, k, v = _qkv(1, length, span)
    mask = _left_padded_causal(length, span, [5])
    ours = ck.attention(q, k, v, 0.125, mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert not mx.any(mx.isnan(ours)).item()
    assert mx.allclose(ours, theirs, rtol=1e-4, atol=1e-5).item()


def test_swiglu_matches_silu_times_up():
    gate = mx.linspace(-120.0, 120.0, 4001).reshape(1, 1, -1)
    up = mx.random.normal(gate.shape, key=mx.random.key(1))
    want = gate * mx.sigmoid(gate) * up
    assert mx.allclose(ck.swiglu(gate, up), want, rtol=1e-4, atol=1e-6).item()


def test_self_check_passes_here():
    assert ck._self_check() is None


def test_glibc_takes_the_heap_settings():
    assert keep_freed_heap() is True
