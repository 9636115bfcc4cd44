"""Token ids to text: one token on its own (logprobs), and the streaming detokenizer.

One token on its own, as text and exact bytes, for logprobs:
``tokenizer.decode([id])`` turns a token that holds part of a UTF-8 character into U+FFFD, so
its ``bytes`` would be wrong. Byte-level BPE vocabularies (GPT-2 style, SmolLM2's) spell each
token in a printable alphabet with one character per byte: mapping it back gives the exact
bytes. Other tokenizers fall back to the decoded text's UTF-8.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder


def streaming_detokenizer(tokenizer: Any, keep_leading_space: bool = False) -> Any:
    """A fresh streaming detokenizer for one sequence.

    mlx-lm's detokenizers drop the first token's leading space, right for a chat answer but
    wrong for a raw completion, which continues the prompt's text: "The capital of France
    is" must go on with " Paris", not "Paris".
    """
    detokenizer = tokenizer.detokenizer
    if keep_leading_space:
        if hasattr(detokenizer, "trim_space"):  # SentencePiece
            detokenizer.trim_space = False
        if isinstance(detokenizer, BPEStreamingDetokenizer):  # no switch: bypass the trim
            detokenizer._maybe_trim_space = lambda text: text
    return detokenizer


def token_piece(tokenizer: Any, token_id: int) -> tuple[str, tuple[int, ...]]:
    """``(text, bytes)`` of one token of an mlx-lm ``TokenizerWrapper``."""
    text = tokenizer.decode([token_id])
    detokenizer = getattr(tokenizer, "_detokenizer", None)
    if isinstance(detokenizer, BPEStreamingDetokenizer) and token_id < len(detokenizer.tokenmap):
        spelled = detokenizer.tokenmap[token_id]
        table = _byte_decoder()
        if spelled and all(c in table for c in spelled):
            return text, tuple(table[c] for c in spelled)
    return text, tuple(text.encode("utf-8"))
