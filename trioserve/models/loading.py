"""Load an mlx-lm model directory into a model and tokenizer, with one-line errors.

Why: mlx-lm raises a variety of exceptions (FileNotFoundError, ValueError, JSON and
safetensors errors, hub lookups for non-paths); the server wants one error type whose
message names the directory. Call `load_model` on the engine's worker thread: MLX streams
belong to the thread that creates them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trioserve.models.errors import ModelLoadError

DEFAULT_CONTEXT_LENGTH = 2048


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _eos_ids_from_files(path: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(path / name).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return [int(i) for i in ids]


def load_model(path: Path, shard_group: Any = None) -> tuple[Any, Any]:
    """`mlx_lm.load` a local model directory; returns (model, TokenizerWrapper).

    With ``shard_group`` (an ``mx.distributed`` group), keep only this rank's tensor-parallel
    shard (mlx-lm's ``model.shard``): the weights are read lazily, so each rank holds only
    its own part once they are evaluated.

    Raises ModelLoadError (one line, naming `path`) on any failure, including a tokenizer
    without end-of-sequence ids (generation would never stop).
    """
    path = Path(path)
    if not path.is_dir():  # never let mlx-lm treat it as a hub repo id
        raise ModelLoadError(path, "no such model directory")
    if shard_group is not None:
        _check_shardable(path, shard_group.size())
    try:
        import mlx.core as mx
        import mlx_lm

        model, tokenizer = mlx_lm.load(str(path), lazy=shard_group is not None)
        if shard_group is not None:
            if not hasattr(model, "shard"):
                raise ModelLoadError(
                    path, f"mlx-lm has no tensor-parallel sharding for {type(model).__module__}"
                )
            model.shard(shard_group)
            mx.eval(model.parameters())
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(path, f"{type(exc).__name__}: {exc}") from exc
    if not tokenizer.eos_token_ids:
        for token_id in _eos_ids_from_files(path):
            tokenizer.add_eos_token(token_id)
    if not tokenizer.eos_token_ids:
        raise ModelLoadError(path, "the tokenizer has no end-of-sequence token id")
    return model, tokenizer


def _check_shardable(path: Path, ranks: int) -> None:
    """mlx-lm divides the attention heads (and KV heads) by the number of ranks."""
    config = _read_json(path / "config.json")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    for what, count in (("attention heads", heads), ("KV heads", kv_heads)):
        if isinstance(count, int) and count % ranks:
            raise ModelLoadError(
                path,
                f"its {count} {what} cannot be split over {ranks} ranks: launch a number of "
                f"ranks that divides both {heads} and {kv_heads}",
            )


def model_context_length(path: Path) -> int:
    """The model's context length (config.json max_position_embeddings), default 2048."""
    value = _read_json(Path(path) / "config.json").get("max_position_embeddings")
    try:
        return int(value) if value and int(value) > 0 else DEFAULT_CONTEXT_LENGTH
    except (TypeError, ValueError):
        return DEFAULT_CONTEXT_LENGTH


def model_vocab_size(path: Path) -> int | None:
    """Rows of the model's embedding (config.json vocab_size), or None when not stated.
    Can differ from the tokenizer's length (padded or extended vocabularies)."""
    value = _read_json(Path(path) / "config.json").get("vocab_size")
    try:
        return int(value) if value and int(value) > 0 else None
    except (TypeError, ValueError):
        return None
