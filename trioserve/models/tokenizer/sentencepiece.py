"""SentencePiece BPE (`tokenizer.ggml.model == "llama"`): Llama 2, Mistral, Phi-3, Gemma.

Rebuilt as their Hugging Face tokenizer.json files are: a BPE model over the pieces, with
`<0x..>` byte tokens as fallback, spaces written `▁`, and merges recovered from the
vocabulary (SentencePiece merges the adjacent pair whose joined piece scores best; a
merge list ranked by that score does the same).
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers

from trioserve.models.tokenizer.common import (
    CONTROL,
    NORMAL,
    UNKNOWN,
    add_gguf_tokens,
    tokens_and_types,
    vocab_of,
)

SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space


def _is_gemma(metadata: dict[str, Any]) -> bool:
    return str(metadata.get("general.architecture", "")).startswith("gemma")


def _respell_spaces(token: str) -> str:
    # Gemma files store runs of spaces as real spaces; the model sees them as "▁▁...".
    return token.replace(" ", SPACE) if token and not token.strip() else token


def _ranks(metadata: dict[str, Any], n_tokens: int) -> list[float]:
    """Merge priority of each piece, higher first."""
    scores = metadata.get("tokenizer.ggml.scores")
    # Gemma's scores do not follow its merge order, its piece order does (as transformers
    # finds for Gemma GGUFs); files without scores only have the order.
    if _is_gemma(metadata) or not scores or len(scores) != n_tokens:
        return [-float(i) for i in range(n_tokens)]
    return [float(s) for s in scores]


def derive_merges(tokens: list[str], types: list[int], ranks: list[float]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-ranked piece first."""
    normal: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if types[i] == NORMAL:
            normal.setdefault(token, i)
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-ranks[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _merges(metadata: dict[str, Any], tokens: list[str], types: list[int]) -> list[tuple[str, str]]:
    given = metadata.get("tokenizer.ggml.merges")
    if given:  # a few converters write them; trust the file
        return [tuple(m.split(" ", 1)) for m in given if " " in m]  # type: ignore[misc]
    return derive_merges(tokens, types, _ranks(metadata, len(tokens)))


def _unknown(metadata: dict[str, Any], tokens: list[str], types: list[int]) -> str | None:
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk is not None and 0 <= int(unk) < len(tokens):
        return tokens[int(unk)]
    return next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)


def _rstrip(metadata: dict[str, Any], tokens: list[str], types: list[int]) -> frozenset[str]:
    """Phi-3's chat tokens swallow the newline after them (its tokenizer.json says
    rstrip; llama.cpp sets the same for phi3 by name)."""
    if metadata.get("general.architecture") != "phi3":
        return frozenset()
    keep = {"<unk>", "<s>", "<|endoftext|>"}
    return frozenset(
        t for t, k in zip(tokens, types, strict=True) if k == CONTROL and t not in keep
    )


def adds_space_prefix(metadata: dict[str, Any]) -> bool:
    """llama.cpp's rule: the file's flag, else yes (Gemma files say no; older ones may not)."""
    flag = metadata.get("tokenizer.ggml.add_space_prefix")
    return bool(flag) if flag is not None else not _is_gemma(metadata)


def build_sentencepiece(metadata: dict[str, Any]) -> Tokenizer:
    """A SentencePiece-like `tokenizers.Tokenizer` (no BOS/EOS post-processor)."""
    tokens, types = tokens_and_types(metadata)
    tokens = [_respell_spaces(t) for t in tokens]
    model = models.BPE(
        vocab=vocab_of(tokens),
        merges=_merges(metadata, tokens, types),
        unk_token=_unknown(metadata, tokens, types),
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if adds_space_prefix(metadata):
        # Like llama.cpp, every stretch of text between special tokens gets the prefix.
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
        )
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence(steps)
    add_gguf_tokens(tok, tokens, types, rstrip=_rstrip(metadata, tokens, types))
    return tok
