"""Shared fixtures for the model tests: the embedded model, converted once per machine."""

from __future__ import annotations

from pathlib import Path

import pytest

import trioserve  # noqa: F401  (first: binds MLX to OpenBLAS before anything imports mlx)
from trioserve.models import default_gguf_path, load_model, resolve


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model from the user's cache (converted on the first run only)."""
    return resolve(None).path


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path):
    return load_model(model_dir)


@pytest.fixture(scope="session")
def gguf_metadata(gguf_path: Path) -> dict:
    from trioserve.models.gguf import read_metadata

    return read_metadata(gguf_path)


@pytest.fixture(scope="session")
def ask():
    """ask(model, tokenizer, question): the chat model's greedy answer to one user message."""
    import mlx_lm

    def answer(model, tokenizer, question: str, max_tokens: int = 20) -> str:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)

    return answer
