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
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if top_p:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample
