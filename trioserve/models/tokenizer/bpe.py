"""Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`): GPT-2, SmolLM, Llama 3, Qwen...

The merges are in the file; what the file only names (`tokenizer.ggml.pre`) is how text is
split before merging. Each name maps to the split of the models' own tokenizer.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from trioserve.models.tokenizer.common import (
    TokenizerMetadataError,
    add_gguf_tokens,
    tokens_and_types,
    vocab_of,
)

log = logging.getLogger(__name__)

# The split regexes of the models' tokenizer.json files (llama.cpp's llama-vocab.cpp
# carries the same ones, rewritten for its own regex engine).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class Split:
    """How one family splits text before merging, and llama.cpp's defaults for it."""

    regexes: tuple[str, ...] = ()  # empty: GPT-2's own regex (ByteLevel's built-in)
    digits: bool = False  # every digit alone first (StarCoder, SmolLM)
    nfc: bool = False  # NFC normalizer (Qwen)
    ignore_merges: bool = False  # a word already in the vocabulary is one token (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_GPT2_SPLIT = Split()
_STARCODER_SPLIT = Split(digits=True)
_LLAMA3_SPLIT = Split((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_SPLIT = Split((_QWEN2,), nfc=True)


def _family(names: str, split: Split) -> dict[str, Split]:
    return dict.fromkeys(names.split(), split)


# llama.cpp's `tokenizer.ggml.pre` names, grouped as llama-vocab.cpp groups them.
PRE_TOKENIZERS: dict[str, Split] = {
    **_family(
        "gpt-2 gpt2 phi-2 mpt olmo jais trillion granite-docling exaone4 mellum "
        "gigachat a.x-4.0 jina-es jina-de jina-v2-es jina-v2-de",
        _GPT2_SPLIT,
    ),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b", _STARCODER_SPLIT),
    **_family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe",
        _LLAMA3_SPLIT,
    ),
    **_family("chatglm-bpe glm4", Split((_LLAMA3,))),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez", _QWEN2_SPLIT),
    **_family("stablelm2 hunyuan grok-2", Split((_QWEN2,))),
    "qwen35": Split((_QWEN35,), nfc=True),
    "tekken": Split((_TEKKEN,), ignore_merges=True, add_bos=True),
    **_family("gpt-4o llama4 minimax-m2", Split((_GPT4O,))),
    **_family("deepseek-v3 hunyuan-dense", Split(_DEEPSEEK_V3)),
}


def split_of(pre: str | None) -> Split:
    """The split for a `tokenizer.ggml.pre` name; refuses names we cannot reproduce."""
    if pre in (None, "default"):
        # Files older than the key, or of a model llama.cpp did not recognize: llama.cpp
        # splits those GPT-2-like too.
        log.warning("GGUF tokenizer.ggml.pre is %r: using GPT-2's split rules", pre)
        return _GPT2_SPLIT
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        # A wrong split gives other token ids than the model was trained on, and the
        # model quietly answers worse: better to say so than to guess.
        raise TokenizerMetadataError(
            f"unsupported byte-level BPE pre-tokenizer {pre!r} "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        ) from None


def adds_bos_by_default(pre: str | None) -> bool:
    """llama.cpp's add_bos default for a byte-level vocabulary with this pre-tokenizer."""
    return PRE_TOKENIZERS.get(pre or "", _GPT2_SPLIT).add_bos


def _pre_tokenizer(split: Split) -> pre_tokenizers.PreTokenizer:
    if not split.regexes:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split.digits:
            return pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        return byte_level
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _merges(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerMetadataError("tokenizer merges missing from metadata")
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise TokenizerMetadataError(f"malformed tokenizer merge {merge!r}")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def build_byte_level(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` (no BOS/EOS post-processor)."""
    tokens, types = tokens_and_types(metadata)
    split = split_of(metadata.get("tokenizer.ggml.pre"))
    model = models.BPE(
        vocab=vocab_of(tokens),
        merges=_merges(metadata),
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=split.ignore_merges,
    )
    tok = Tokenizer(model)
    if split.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(split)
    tok.decoder = decoders.ByteLevel()
    add_gguf_tokens(tok, tokens, types)
    return tok
