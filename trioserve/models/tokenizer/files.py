"""The tokenizer for any supported GGUF vocabulary, and the Hugging Face files mlx-lm loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from trioserve.models.tokenizer.bpe import adds_bos_by_default, build_byte_level
from trioserve.models.tokenizer.common import CONTROL, TokenizerMetadataError
from trioserve.models.tokenizer.sentencepiece import build_sentencepiece

_BUILDERS = {"gpt2": build_byte_level, "llama": build_sentencepiece}
_KINDS = "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"

# Hugging Face's name for a special token -> the GGUF metadata key of its id.
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}
# llama.cpp's ids for a SentencePiece file that names none (<unk>, <s>, </s>).
_SENTENCEPIECE_DEFAULTS = {"bos": 1, "eos": 2, "unk": 0}
# Control tokens that end a turn; llama.cpp stops on them when the file names no eot id.
_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def _kind(metadata: dict[str, Any]) -> str:
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise TokenizerMetadataError(f"unsupported tokenizer model {kind!r} (supported: {_KINDS})")
    return kind


def _adds(metadata: dict[str, Any], which: str) -> bool:
    """Whether encoding adds BOS / EOS: the file's flag, else llama.cpp's default."""
    flag = metadata.get(f"tokenizer.ggml.add_{which}_token")
    if flag is not None:
        return bool(flag)
    if which == "eos":
        return False
    if _kind(metadata) == "llama":
        return True
    return adds_bos_by_default(metadata.get("tokenizer.ggml.pre"))


def _post_processor(metadata: dict[str, Any]) -> processors.PostProcessor | None:
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = special_token_ids(metadata)
    single, pair, specials = "$A:0", "$B:1", []
    if _adds(metadata, "bos") and "bos_token_id" in ids:
        bos = tokens[ids["bos_token_id"]]
        single, pair = f"{bos}:0 {single}", f"{bos}:1 {pair}"
        specials.append((bos, ids["bos_token_id"]))
    if _adds(metadata, "eos") and "eos_token_id" in ids:
        eos = tokens[ids["eos_token_id"]]
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        specials.append((eos, ids["eos_token_id"]))
    if not specials:
        return None
    return processors.TemplateProcessing(
        single=single, pair=f"{single} {pair}", special_tokens=specials
    )


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` from plain-Python GGUF metadata; `encode` adds BOS/EOS
    where the model does."""
    tok = _BUILDERS[_kind(metadata)](metadata)
    post = _post_processor(metadata)
    if post is not None:
        tok.post_processor = post
    return tok


def special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    """The valid bos/eos/pad/unk token ids in the metadata, e.g. {"eos_token_id": 2}."""
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    spm = metadata.get("tokenizer.ggml.model") == "llama"
    ids = {}
    for name, key in _SPECIAL_KEYS.items():
        value = metadata.get(key)
        if value is None and spm:
            value = _SENTENCEPIECE_DEFAULTS.get(name)
        if value is not None and 0 <= int(value) < n_tokens:
            ids[f"{name}_token_id"] = int(value)
    return ids


def stop_token_ids(metadata: dict[str, Any]) -> list[int]:
    """EOS first, then the end-of-turn / end-of-message ids generation must stop on too."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    ids = [special_token_ids(metadata).get("eos_token_id")]
    ids += [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    if metadata.get("tokenizer.ggml.eot_token_id") is None:
        types = metadata.get("tokenizer.ggml.token_type") or []
        pairs = enumerate(zip(tokens, types, strict=False))
        ids += [i for i, (token, t) in pairs if t == CONTROL and token in _END_OF_TURN]
    valid = [int(i) for i in ids if i is not None and 0 <= int(i) < len(tokens)]
    return list(dict.fromkeys(valid))


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
        # transformers rebuilds the BOS/EOS post-processor from these two flags.
        "add_bos_token": _adds(metadata, "bos") and "bos_token" in names,
        "add_eos_token": _adds(metadata, "eos"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", names)

    generation = {k: v for k, v in ids.items() if k != "unk_token_id"}
    stops = stop_token_ids(metadata)
    generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    _write_json(out_dir / "generation_config.json", generation)
