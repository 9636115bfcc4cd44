"""Checkpoints between the layers of a prefill chunk, so a cancel can cut a chunk short.

MLX cannot interrupt an evaluation, so without this a client that hangs up mid-prompt still
costs the rest of the chunk in flight (~0.3 s at 64 tokens, ~1.1 s at 256 on a 2-core CPU).
Each transformer layer is wrapped: while a prefill chunk runs (more than one token per row),
its output is evaluated and the worker's checkpoint runs, which raises ``PrefillCancelled``
when nobody is waiting for the chunk any more. Decode steps (one token per row) pass straight
through, so their lazy pipelining is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

log = logging.getLogger(__name__)


class PrefillCancelled(Exception):
    """Every sequence of the batch was cancelled in the middle of a prefill chunk."""


_local = threading.local()


@contextlib.contextmanager
def passthrough() -> Iterator[None]:
    """A forward pass with several positions per row that is not a prefill chunk (a
    speculative verification, engine/speculation.py): the gates stay lazy and never call the
    checkpoint during it. Per thread: each worker thread owns its own model."""
    _local.passthrough = True
    try:
        yield
    finally:
        _local.passthrough = False


class _LayerGate:
    """One layer, with a checkpoint after it during prefill. Attribute reads pass through."""

    def __init__(self, layer: Any, checkpoint: Callable[[], None]) -> None:
        self.__dict__["_layer"] = layer
        self.__dict__["_checkpoint"] = checkpoint

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        out = self._layer(x, *args, **kwargs)
        if x.ndim >= 2 and x.shape[1] > 1 and not getattr(_local, "passthrough", False):
            mx.eval(out)
            self._checkpoint()
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["_layer"], name)


def install_prefill_gates(model: Any, checkpoint: Callable[[], None]) -> bool:
    """Wrap the model's layers in place, all but the last; False (and nothing changed) where
    it has no list of layers to wrap.

    The last layer stays lazy: a prefill chunk needs only its keys and values, and evaluating
    its output would also run its attention output and MLP for nothing (measured: a 1513-token
    prefill took 4-6 % longer with every layer gated, and no longer with all but the last).
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or len(layers) < 2:
        log.info("no layer list on %s: prefill chunks run uninterrupted", type(model).__name__)
        return False
    for i, layer in enumerate(layers[:-1]):
        if not isinstance(layer, _LayerGate):
            layers[i] = _LayerGate(layer, checkpoint)
    return True
