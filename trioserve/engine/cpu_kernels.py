"""Faster attention and SwiGLU for MLX on the CPU, where its transcendental functions are slow.

Why: MLX's Linux CPU build evaluates ``exp`` and ``sigmoid`` one element at a time (measured
on a 2-core x86_64 VM: ~13 ns per element for ``exp``, ~20 for ``sigmoid``, against ~0.3 for
an add; NumPy's ``exp`` is 11x faster). Its scaled-dot-product attention on the CPU is plain
ops whose softmax is mostly ``exp``: for a 256-token prefill chunk on a 1256-token context,
one layer's attention took 55 ms, 40 of them in ``exp``, and its SwiGLU 8.6 ms (the whole MLP
23 ms).

So here ``exp`` is built from cheap ops in compiled elementwise kernels: ``e^x = 2^n * 2^f``
with ``n = round(x log2 e)`` found by the float32 rounding trick, ``2^f`` (``|f| <= 1/2``) by
a degree-6 polynomial (relative error ~3e-6, as ``mx.exp``'s here), and ``2^n`` written into
the exponent bits (~7-12 ms for those 2.9 M scores instead of 40). The attention and MLP of
mlx-lm's llama-family layers use it, on the CPU only (Metal has fused kernels of its own).
Decode steps gain less (their softmax is small, and ours has more ops, each with its own
overhead), but still some: at 8 sequences on a 300-token context, interleaved A/B of 288
steps each, median step 131 ms against 135, p95 151 against 159. A decode step of one or two
sequences is too small to repay the extra ops, so it takes MLX's own (``SMALL_ELEMENTS``).
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from typing import Any

import mlx.core as mx

from trioserve.config import truthy

log = logging.getLogger(__name__)

OFF_ENV = "TRIOSERVE_NO_CPU_KERNELS"  # set to 1: MLX's own kernels (a fallback, and for A/B)

_LOG2E = 1.4426950408889634
_ROUNDER = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 (|x| < 2**22) to an integer
_ROUNDER_BITS = 0x4B400000  # the int32 bit pattern of _ROUNDER
# 2^f = e^(f ln 2) for |f| <= 1/2, highest power first (Horner).
_POW2_COEFFS = tuple(math.log(2) ** k / math.factorial(k) for k in range(6, -1, -1))


# MLX cannot fuse ``view`` (the bit cast) into a compiled kernel, nor compile it shapeless, so
# exp is three shapeless kernels around the two casts: no retrace per shape, no trace cache
# that grows with every new context length.
@partial(mx.compile, shapeless=True)
def _exp_reduce(x: mx.array) -> tuple[mx.array, mx.array]:
    # Clamped so that 2^n stays a normal float or exactly 0 (n = -127 gives zero bits).
    t = mx.clip(x * _LOG2E, -127.0, 127.0)
    return t, t + _ROUNDER  # the second holds round(t) in its low mantissa bits


@partial(mx.compile, shapeless=True)
def _pow2_bits(rounded_bits: mx.array) -> mx.array:
    return mx.left_shift(rounded_bits + (127 - _ROUNDER_BITS), 23)  # 2^n as float32 bits


@partial(mx.compile, shapeless=True)
def _exp_finish(t: mx.array, rounded: mx.array, pow2n: mx.array) -> mx.array:
    f = t - (rounded - _ROUNDER)  # t - n, in [-1/2, 1/2]
    p = _POW2_COEFFS[0]
    for c in _POW2_COEFFS[1:]:
        p = p * f + c
    return p * pow2n


def fast_exp(x: mx.array) -> mx.array:
    """e^x for float32 from adds, multiplies and bit moves; 0 below e^-88, finite above."""
    t, rounded = _exp_reduce(x)
    pow2n = _pow2_bits(rounded.view(mx.int32)).view(mx.float32)
    return _exp_finish(t, rounded, pow2n)


_MASKED = mx.finfo(mx.float32).min  # as mlx-lm masks: a fully masked row averages, never NaN


# Below this many elements (attention scores, SwiGLU inputs) MLX's own ops serve: each extra
# op of ours costs ~20 us where exp saves ~10 ns per element. One decoding sequence is below
# it (SwiGLU: 1536; 9 heads x a 300-token context = 2700 scores): in-process, 2 BLAS
# threads, its decode went from 12.0-12.5 to 13.3-13.7 tok/s, 8 streams unchanged (their
# 12288-element SwiGLU stays ours; 16384 here cost 8 streams ~7 % at one thread).
SMALL_ELEMENTS = 4096


@partial(mx.compile, shapeless=True)
def _mlx_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return mx.sigmoid(gate) * gate * up


@partial(mx.compile, shapeless=True)
def _gate_times_up(gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array]:
    return gate * up, -gate


@partial(mx.compile, shapeless=True)
def _over_one_plus(x: mx.array, y: mx.array) -> mx.array:
    return x / (1.0 + y)


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # silu(gate) * up = gate * up / (1 + e^-gate); e^-gate saturates instead of overflowing.
    product, negated = _gate_times_up(gate, up)
    return _over_one_plus(product, fast_exp(negated))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (float32 only; other dtypes take MLX's own ops)."""
    if gate.dtype != mx.float32:
        return _mlx_swiglu(gate, up)
    return _swiglu(gate, up)


def softmax_parts(scores: mx.array, mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Softmax over the last axis, left unnormalized: ``(e, sum)`` with softmax = e / sum.
    ``mask`` (bool, broadcastable) keeps where True.

    Each step is its own op: the compiled exp is fast on contiguous input, and a broadcast
    operand inside it (the row max, the mask) would make MLX build a strided kernel that is
    three times slower.
    """
    if mask is not None:
        scores = mx.where(mask, scores, _MASKED)
    e = fast_exp(scores - mx.max(scores, axis=-1, keepdims=True))
    return e, mx.sum(e, axis=-1, keepdims=True)


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None,
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` for float32 on the CPU, same arguments and
    result: queries (B, Hq, L, D), keys and values (B, Hkv, S, D), grouped-query heads."""
    if queries.dtype != mx.float32:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    batch, n_q, length, dim = queries.shape
    n_kv, span = keys.shape[1], keys.shape[2]
    repeats = n_q // n_kv
    # (B, Hkv, repeats, L, D): every query head of a group against its one key head.
    q = (queries * scale).reshape(batch, n_kv, repeats, length, dim)
    scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal": the queries are the last L positions
        rows = mx.arange(span - length, span)[:, None]
        mask = rows >= mx.arange(span)[None]
    elif mask is not None and mask.ndim == 4:  # (B, 1 or Hq, L, S) -> the grouped shape
        if mask.shape[1] == 1:
            mask = mx.expand_dims(mask, 2)
        else:
            mask = mask.reshape(mask.shape[0], n_kv, repeats, *mask.shape[2:])
    if mask is not None and mask.dtype != mx.bool_:  # an additive mask
        scores = scores + mask
        mask = None
    e, total = softmax_parts(scores, mask)
    # Normalize the (L, D) output rather than the (L, S) weights: fewer divisions.
    out = (e @ mx.expand_dims(values, 2)) / total
    return out.reshape(batch, n_q, length, dim)


def _make_attention_class(base: type) -> type:
    class CpuAttention(base):  # type: ignore[misc, valid-type]
        """mlx-lm's llama attention with ``attention`` above in place of MLX's SDPA."""

        def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
            if cache is not None and hasattr(cache, "bits"):  # quantized KV: mlx-lm's path
                return base.__call__(self, x, mask, cache)
            b, length, _ = x.shape
            q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
            k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            offset = cache.offset if cache is not None else 0
            q = self.rope(q, offset=offset)
            k = self.rope(k, offset=offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            if b * self.n_heads * length * k.shape[2] < SMALL_ELEMENTS:  # decode: MLX's
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
            else:
                out = attention(q, k, v, self.scale, mask)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))

    return CpuAttention


def _make_mlp_class(base: type) -> type:
    class CpuMLP(base):  # type: ignore[misc, valid-type]
        """mlx-lm's llama MLP with ``swiglu`` above."""

        def __call__(self, x: mx.array) -> mx.array:
            gate, up = self.gate_proj(x), self.up_proj(x)
            small = gate.size < SMALL_ELEMENTS  # decode: MLX's own ops are faster
            return self.down_proj(_mlx_swiglu(gate, up) if small else swiglu(gate, up))

    return CpuMLP


def _self_check() -> str | None:
    """Compare the kernels with MLX's own on small inputs (this also JIT-builds them, which
    needs a C++ compiler on Linux); the reason they cannot be used, or None."""
    try:
        key = mx.random.key(0)
        kq, kk, kv = mx.random.split(key, 3)
        q = mx.random.normal((2, 6, 5, 16), key=kq)
        k = mx.random.normal((2, 2, 9, 16), key=kk)
        v = mx.random.normal((2, 2, 9, 16), key=kv)
        mask = mx.arange(9)[None, None, None, :] >= mx.array([0, 3]).reshape(2, 1, 1, 1)
        mask = mask & (mx.arange(4, 9)[:, None] >= mx.arange(9)[None])
        for m in ("causal", mask, None):
            ours = attention(q, k, v, 0.25, m)
            theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
            if not mx.allclose(ours, theirs, rtol=1e-4, atol=1e-5).item():
                return f"attention differs from MLX's (mask {type(m).__name__})"
        g = mx.linspace(-100.0, 100.0, 401)
        if not mx.allclose(swiglu(g, g), g * g * mx.sigmoid(g), rtol=1e-4, atol=1e-5).item():
            return "swiglu differs from MLX's"
    except Exception as exc:  # e.g. no C++ compiler for mx.compile's CPU kernels
        return f"{type(exc).__name__}: {exc}"
    return None


def install_cpu_kernels(model: Any) -> bool:
    """Switch the llama-family layers of ``model`` to the kernels above, in place, when MLX
    runs on the CPU and they pass a self-check; True when installed."""
    if mx.default_device() != mx.cpu:
        return False
    if truthy(os.environ.get(OFF_ENV)):
        log.info("%s is set: MLX's own attention and MLP kernels", OFF_ENV)
        return False
    from mlx_lm.models import llama  # the family whose layers are switched

    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        return False
    attn_base, mlp_base = llama.Attention, llama.MLP
    blocks = [(layer.self_attn, layer.mlp) for layer in layers if hasattr(layer, "self_attn")]
    if len(blocks) != len(layers) or not all(
        type(a) is attn_base and type(m) is mlp_base for a, m in blocks
    ):
        log.info("not a llama-family model: MLX's own attention and MLP kernels")
        return False
    reason = _self_check()
    if reason is not None:
        log.warning("fast CPU kernels are off (%s): MLX's slower ones run", reason)
        return False
    attn_cls, mlp_cls = _make_attention_class(attn_base), _make_mlp_class(mlp_base)
    for attn, mlp in blocks:
        attn.__class__ = attn_cls
        mlp.__class__ = mlp_cls
    log.info("fast CPU attention and SwiGLU kernels installed in %d layers", len(blocks))
    return True
