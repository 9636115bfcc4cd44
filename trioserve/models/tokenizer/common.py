"""What both tokenizer kinds share: the error, GGUF token types and the added tokens."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer

# GGUF token types (llama.cpp's llama_token_type).
NORMAL = 1
UNKNOWN = 2
CONTROL = 3
USER_DEFINED = 4
BYTE = 6


class TokenizerMetadataError(ValueError):
    """The GGUF tokenizer metadata is missing or of a kind we cannot rebuild."""


def tokens_and_types(metadata: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The vocabulary and its token types (all NORMAL when the file has none)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerMetadataError("tokenizer vocabulary missing from metadata")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerMetadataError("tokenizer token_type and tokens differ in length")
    return list(tokens), [int(t) for t in types]


def vocab_of(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a token listed twice keeps its first id, as llama.cpp's lookup does."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def add_gguf_tokens(
    tok: Tokenizer, tokens: list[str], types: list[int], rstrip: frozenset[str] = frozenset()
) -> None:
    """Keep control and unknown tokens (special) and user-defined tokens (not special) whole.

    llama.cpp matches all three in the raw text before splitting it, so they are added
    unnormalized; being in the model's vocabulary already, they keep their ids. A token in
    `rstrip` also swallows the whitespace after it.
    """
    specials = [
        AddedToken(tokens[i], special=True, normalized=False, rstrip=tokens[i] in rstrip)
        for i, t in enumerate(types)
        if t in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
