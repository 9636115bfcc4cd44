"""A draft model for speculative decoding (``--draft-model``): a smaller model with the
model's tokenizer proposes the next tokens of each drafting sequence, and the batch verifies
them (engine/speculation.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

DRAFT_MODEL = "draft-model"


class DraftModelMismatch(ValueError):
    """The draft model's tokenizer is not the model's: its token ids would mean other text."""


def check_same_tokenizer(model_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Refuse a draft model whose tokenizer differs from the model's.

    Raises:
        DraftModelMismatch: naming what differs (vocabulary, special ids).
    """
    ours, theirs = _vocab(model_tokenizer), _vocab(draft_tokenizer)
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise DraftModelMismatch(
            f"the draft model's tokenizer is not the model's: {len(ours)} against "
            f"{len(theirs)} tokens, differing in {differ}"
        )
    if set(model_tokenizer.eos_token_ids) != set(draft_tokenizer.eos_token_ids):
        raise DraftModelMismatch(
            "the draft model's end-of-sequence ids are not the model's: "
            f"{sorted(draft_tokenizer.eos_token_ids)} against "
            f"{sorted(model_tokenizer.eos_token_ids)}"
        )


def _vocab(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


@dataclass(frozen=True)
class DraftModel:
    """The loaded draft model, checked against the model's tokenizer."""

    model: Any
    vocab_size: int  # the model's token ids are below this

    def drafter(self, chunk: int) -> ModelDrafter:
        """The drafting state of one new sequence."""
        return ModelDrafter(self.model, chunk=chunk, vocab_size=self.vocab_size)


def load_draft_model(load: Any, model_tokenizer: Any) -> DraftModel:
    """Call ``load`` (returns (model, tokenizer)) and check the tokenizer; on the MLX thread."""
    model, tokenizer = load()
    check_same_tokenizer(model_tokenizer, tokenizer)
    return DraftModel(model, len(_vocab(model_tokenizer)))


class ModelDrafter:
    """Proposes what a smaller model with the same tokenizer (``--draft-model``) would write
    next, greedily: a draft is still one guess, so verification stays exact.

    It keeps a KV cache of its own for this sequence and, unlike the lookup drafters, is told
    the pending token (``needs_pending``): a draft model's guesses all hang on it. The cache
    follows the sequence: rejected drafts are trimmed off before the next proposal, and the
    prompt is read ``chunk`` tokens per step (no draft until it is), so one long prompt never
    stalls the batch for a whole prefill.
    """

    method = DRAFT_MODEL
    needs_pending = True

    def __init__(self, model: Any, *, chunk: int = 128, vocab_size: int | None = None) -> None:
        self._model = model
        self._vocab_size = vocab_size  # the model's: a padded draft head may propose beyond
        self._cache = make_prompt_cache(model)
        self._chunk = max(1, chunk)
        self._history: list[int] = []
        self._fed: list[int] = []  # the tokens in the draft model's cache, in order
        if not can_trim_prompt_cache(self._cache):
            raise ValueError("the draft model's cache cannot be trimmed")

    def observe(self, tokens: Sequence[int]) -> None:
        self._history.extend(tokens)

    def propose_after(self, pending: int, k: int) -> list[int]:
        """Up to ``k`` tokens to follow the history and then ``pending``."""
        if k <= 0:
            return []
        target = [*self._history, pending]
        same = 0
        for a, b in zip(self._fed, target, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(target) - 1)  # the last token is fed again: its logits are needed
        if len(self._fed) > same:
            trim_prompt_cache(self._cache, len(self._fed) - same)
            del self._fed[same:]
        behind = target[same:]
        if len(behind) > self._chunk:  # catching up on the prompt: one chunk a step
            self._feed(behind[: self._chunk])
            mx.eval([c.state for c in self._cache])
            return []
        logits = self._feed(behind)
        drafted = []
        for j in range(k):
            token = mx.argmax(logits[:, -1, :], axis=-1)
            drafted.append(token)
            if j < k - 1:
                logits = self._model(token.reshape(1, 1), cache=self._cache)
        out = mx.concatenate(drafted).tolist()
        self._fed.extend(out[:-1])
        if self._vocab_size is not None:  # never feed the model a token id it does not have
            for j, t in enumerate(out):
                if t >= self._vocab_size:
                    return out[:j]
        return out

    def _feed(self, tokens: list[int]) -> mx.array:
        self._fed.extend(tokens)
        return self._model(mx.array([tokens], dtype=mx.int32), cache=self._cache)
