"""A token on its own, for logprobs: text from the tokenizer, bytes exact."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from trioserve.engine.token_text import token_piece


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def test_whole_characters(tokenizer):
    ids = tokenizer.encode("héllo <|im_end|>", add_special_tokens=False)
    pieces = [token_piece(tokenizer, i) for i in ids]
    assert "".join(text for text, _ in pieces) == "héllo <|im_end|>"
    assert b"".join(bytes(raw) for _, raw in pieces) == "héllo <|im_end|>".encode()


def test_half_a_character_keeps_its_real_byte(tokenizer):
    # Byte-level BPE has a token for every single byte; 0xC3 alone is not UTF-8.
    (token_id,) = tokenizer.convert_tokens_to_ids(["Ã"])
    text, raw = token_piece(tokenizer, token_id)
    assert raw == (0xC3,)
    assert text == "\ufffd"
