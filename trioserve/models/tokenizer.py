"""Rebuild a Hugging Face tokenizer from the tokenizer stored in GGUF metadata.

Why: a GGUF file carries its vocabulary, merges, special tokens and chat template as
metadata, but mlx-lm loads tokenizers through `transformers` from `tokenizer.json` and
`tokenizer_config.json`. With no model hub reachable, we write those files ourselves.
Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp's `tokenizer.ggml.pre` names whose split rules we can reproduce.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerMetadataError(ValueError):
    """The GGUF tokenizer metadata is missing or of a kind we cannot rebuild."""


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # GPT-2 split, with every digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in (None, "default", "gpt-2", "gpt2"):
        log.warning("unknown GGUF pre-tokenizer %r: using GPT-2's split rules", pre)
    return byte_level


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from plain-Python GGUF metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerMetadataError(
            f"unsupported tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerMetadataError("tokenizer vocabulary or merges missing from metadata")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerMetadataError("tokenizer token_type and tokens differ in length")

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise TokenizerMetadataError("malformed tokenizer merges")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    specials = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t == _CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == _USER_DEFINED
    ]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    return tok


# Hugging Face's name for a special token -> the GGUF metadata key of its id.
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}


def special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    """The valid bos/eos/pad/unk token ids in the metadata, e.g. {"eos_token_id": 2}."""
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    ids = {}
    for name, key in _SPECIAL_KEYS.items():
        value = metadata.get(key)
        if value is not None and 0 <= int(value) < n_tokens:
            ids[f"{name}_token_id"] = int(value)
    return ids


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_tokenizer_files(metadata: dict[str, Any], out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json into `out_dir`."""
    tok = build_tokenizer(metadata)
    # Written from Python so that a full disk raises OSError.
    with open(out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(tok.to_str())

    tokens = metadata["tokenizer.ggml.tokens"]
    ids = special_token_ids(metadata)
    names = {key[: -len("_id")]: tokens[i] for key, i in ids.items()}
    if "eos_token" not in names:
        raise TokenizerMetadataError("no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", names)
    ids.pop("unk_token_id", None)
    _write_json(out_dir / "generation_config.json", ids)
