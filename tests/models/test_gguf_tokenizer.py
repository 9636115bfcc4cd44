"""The tokenizer rebuilt from GGUF metadata round-trips text and keeps special tokens whole."""

from __future__ import annotations

import json

import pytest

from trioserve.models.tokenizer import (
    TokenizerMetadataError,
    build_tokenizer,
    write_tokenizer_files,
)

SAMPLE = "Hello, wörld! Ünïcödé: 日本語, emoji 🚀, tabs\tand\nnew lines,   spaces. 2024"


def test_round_trip_through_mlx_lm_wrapper(loaded_model):
    _, tokenizer = loaded_model
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert tokenizer.decode(ids) == SAMPLE


def test_round_trip_from_metadata(gguf_metadata):
    tok = build_tokenizer(gguf_metadata)
    assert tok.decode(tok.encode(SAMPLE).ids) == SAMPLE
    assert tok.get_vocab_size() == len(gguf_metadata["tokenizer.ggml.tokens"])


def test_special_tokens_are_single_ids(loaded_model, gguf_metadata):
    _, tokenizer = loaded_model
    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tokenizer.encode(special, add_special_tokens=False) == [tokens.index(special)]
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tokens.index("<|im_start|>") and ids[-1] == tokens.index("<|im_end|>")


def test_eos_matches_metadata(loaded_model, gguf_metadata):
    _, tokenizer = loaded_model
    eos = gguf_metadata["tokenizer.ggml.eos_token_id"]
    assert tokenizer.eos_token_id == eos
    assert eos in tokenizer.eos_token_ids
    assert tokenizer.eos_token == "<|im_end|>"


def test_digits_are_split_like_llama_cpp(gguf_metadata):
    # llama.cpp's "smollm" pre-tokenizer puts every digit in its own token.
    tok = build_tokenizer(gguf_metadata)
    assert len(tok.encode("2024").ids) == 4


def test_no_bos_is_added_and_template_is_chatml(model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in config["chat_template"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_written_files_load_through_mlx_lm(gguf_metadata, tmp_path):
    from mlx_lm.utils import load_tokenizer

    write_tokenizer_files(gguf_metadata, tmp_path, 8192)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    tokenizer = load_tokenizer(tmp_path, eos_token_ids=generation["eos_token_id"])
    ids = tokenizer.encode(SAMPLE)
    assert ids == build_tokenizer(gguf_metadata).encode(SAMPLE).ids
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.chat_template == gguf_metadata["tokenizer.chat_template"]


def test_unsupported_tokenizer_kind_is_refused():
    # Unigram (t5) stays unsupported; the message names it and what is supported.
    with pytest.raises(TokenizerMetadataError, match="unsupported tokenizer model 't5'.*'llama'"):
        build_tokenizer({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
