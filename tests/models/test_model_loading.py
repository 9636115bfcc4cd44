"""Loading a model directory with mlx-lm, and reading its context length."""

from __future__ import annotations

import shutil

import pytest

from trioserve.models import ModelLoadError, load_model, model_context_length


def test_loaded_tokenizer_has_eos(loaded_model):
    _, tokenizer = loaded_model
    assert tokenizer.eos_token_ids == {2}


def test_context_length(model_dir, tmp_path):
    assert model_context_length(model_dir) == 8192
    assert model_context_length(tmp_path) == 2048


def test_missing_dir_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(tmp_path / "nope")


def test_broken_weights_are_a_one_line_load_error(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError) as info:
        load_model(broken)
    message = str(info.value)
    assert str(broken) in message and "\n" not in message
