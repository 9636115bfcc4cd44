"""Models: GGUF conversion, the embedded default model, and loading with mlx-lm."""

from trioserve.models.errors import (
    ConversionError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    OutputExistsError,
)
from trioserve.models.gguf import SUPPORTED_DTYPES, convert_gguf, run_convert_cli
from trioserve.models.loading import load_model, model_context_length
from trioserve.models.registry import default_gguf_path, default_model_name, resolve_model

__all__ = [
    "SUPPORTED_DTYPES",
    "ConversionError",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OutputExistsError",
    "convert_gguf",
    "default_gguf_path",
    "default_model_name",
    "load_model",
    "model_context_length",
    "resolve_model",
    "run_convert_cli",
]
