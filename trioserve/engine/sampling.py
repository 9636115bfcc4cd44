"""Per-request samplers and logits processors for mlx-lm's BatchGenerator.

Greedy requests get ``None`` so the batch keeps one shared, fully batched argmax. A seeded
request gets a sampler that owns its PRNG key: its draws do not depend on what else is in the
batch, so the same seed gives the same output under any load.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, make_logits_processors, make_sampler

from trioserve.engine.params import SamplingParams

Sampler = Callable[[mx.array], mx.array]


def make_request_sampler(params: SamplingParams) -> Sampler | None:
    """The sampler for one sequence, or None for the batch's shared greedy sampler."""
    if params.temperature <= 0:
        return None
    if params.seed is None:
        return make_sampler(temp=params.temperature, top_p=_top_p(params))
    return _seeded_sampler(params.temperature, _top_p(params), params.seed)


def make_request_processors(params: SamplingParams) -> list:
    """Presence/frequency penalties as mlx-lm logits processors (empty when unused)."""
    if not (params.presence_penalty or params.frequency_penalty):
        return []
    return make_logits_processors(
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )


def _top_p(params: SamplingParams) -> float:
    return params.top_p if 0 < params.top_p < 1 else 0.0


def _seeded_sampler(temperature: float, top_p: float, seed: int) -> Sampler:
    return SeededSampler(temperature, top_p, seed)


class SeededSampler:
    """A sampler that owns its PRNG key: each token drawn takes the next key of its chain.

    ``draws``/``advance`` serve speculative verification (engine/speculation.py): the draws
    at several positions with the keys plain decoding would use there, then the chain moves
    on only by the positions that became tokens, so the output is the same with or without
    speculation.
    """

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self._inv_temp = 1 / temperature
        self._top_p = top_p
        self._key = mx.random.key(seed)
        self._ahead: list[mx.array] = []  # the chain after each of the latest draws

    def _draw(self, logprobs: mx.array, key: mx.array) -> mx.array:
        if self._top_p:
            logprobs = apply_top_p(logprobs, self._top_p)
        return mx.random.categorical(logprobs * self._inv_temp, key=key)

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return self._draw(logprobs, sub)

    def draws(self, logprobs: mx.array) -> mx.array:
        """[n, V] -> [n]: row j drawn with the j-th next key; the chain does not move."""
        key, out, self._ahead = self._key, [], []
        for j in range(logprobs.shape[0]):
            key, sub = mx.random.split(key)
            self._ahead.append(key)
            out.append(self._draw(logprobs[j : j + 1], sub).reshape(-1))
        return mx.concatenate(out)

    def advance(self, used: int) -> None:
        """The first ``used`` of the latest draws became tokens."""
        if 0 < used <= len(self._ahead):
            self._key = self._ahead[used - 1]
        self._ahead = []
