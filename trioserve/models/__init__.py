"""Models: what --model names (sources), GGUF conversion, the embedded default model, loading."""

from trioserve.models.errors import (
    ConversionError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    OutputExistsError,
)
from trioserve.models.gguf import SUPPORTED_DTYPES, convert_gguf, run_convert_cli
from trioserve.models.loading import load_model, model_context_length
from trioserve.models.registry import default_gguf_path, default_model_name
from trioserve.models.sources import ResolvedModel, resolve

__all__ = [
    "SUPPORTED_DTYPES",
    "ConversionError",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OutputExistsError",
    "ResolvedModel",
    "convert_gguf",
    "default_gguf_path",
    "default_model_name",
    "load_model",
    "model_context_length",
    "resolve",
    "run_convert_cli",
]
