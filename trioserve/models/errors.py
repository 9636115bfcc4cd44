"""Errors of the model layer, each a one-line message that names the file at fault.

Why: conversion and loading fail for user-facing reasons (a wrong path, a truncated
download, a full disk); the CLI and the server print `str(error)` as is, so it must be
short, single-line and say which file.
"""

from __future__ import annotations

from pathlib import Path


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ModelError(Exception):
    """Base class: something is wrong with a model file or directory."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = _one_line(reason)
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ConversionError(ModelError):
    """A GGUF file cannot be converted into an mlx-lm model directory."""

    def __str__(self) -> str:
        return f"cannot convert {self.path}: {self.reason}"


class OutputExistsError(ConversionError):
    """The conversion's target directory exists (or appeared meanwhile) and is not empty."""


class ModelNotFoundError(ModelError):
    """A model path or the embedded default model is missing or not a model directory."""


class ModelLoadError(ModelError):
    """mlx-lm could not load a model directory."""

    def __str__(self) -> str:
        return f"cannot load model {self.path}: {self.reason}"


class ModelSourceError(ModelNotFoundError):
    """A `--model` value (Hub repo id, `ollama:` name, path) that cannot be resolved.

    The message says what was tried and what to do: `cannot find model 'owner/name': ...`.
    """

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = str(spec)
        super().__init__(spec, reason)

    def __str__(self) -> str:
        return f"cannot find model {self.spec!r}: {self.reason}"
