"""Reuse the KV cache of the longest prompt prefix seen before.

Agentic clients resend the whole conversation every turn, so most of a new prompt was already
processed. When a sequence finishes, its cache (prompt plus answer) is kept; a new prompt
starts from the stored entry that shares the longest prefix and prefills only the rest.
Storage is mlx-lm's ``LRUPromptCache`` (a token trie, LRU eviction, a byte bound); this module
adds what the engine needs around it. Used only on the MLX worker thread.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_MODEL_KEY = "model"  # one model per engine


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 32) -> None:
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self.enabled = max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def lookup(self, prompt: list[int]) -> tuple[list[Any] | None, list[int], int]:
        """Return (cache, tokens still to prefill, cached token count).

        The tokens left are never empty: the model needs at least one input to produce the
        first token's logits, so an exact hit gives back its last token.
        """
        if not self.enabled or len(prompt) < 2:
            return None, prompt, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL_KEY, prompt)
        if cache is None:
            return None, prompt, 0
        if not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt, 0
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, list(rest), len(prompt) - len(rest)

    def store(self, tokens: list[int], cache: list[Any] | None) -> None:
        """Keep a finished sequence's cache (the tokens it holds: prompt and answer)."""
        if not self.enabled or not tokens or not cache:
            return
        if any(c.empty() for c in cache):
            return
        # Materialize the slices now, so the entry does not pin the batch's buffers.
        mx.eval([c.state for c in cache])
        self._lru.insert_cache(_MODEL_KEY, list(tokens), cache)
