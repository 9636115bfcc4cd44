"""GGUF -> mlx-lm conversion on llama.cpp's `gguf` package: every quant type gguf-py
reads, and the llama, qwen2, qwen3, gemma3 and phi3 architectures.

Modules: `reader` (validate and open), `dequantize` (tensors to numpy / MLX triplets),
`architectures` (config.json and weight names per architecture), `convert` (the atomic
write of the output directory).
"""

from trioserve.models.gguf.architectures import SUPPORTED_ARCHITECTURES
from trioserve.models.gguf.convert import (
    COMPLETE_MARKER,
    CONVERTER_VERSION,
    SUPPORTED_DTYPES,
    TEMP_INFIX,
    Progress,
    concrete_dtype,
    convert_gguf,
    default_dtype,
    run_convert_cli,
    temp_dir_prefix,
)
from trioserve.models.gguf.dequantize import SUPPORTED_TENSOR_TYPES
from trioserve.models.gguf.reader import GGUFHeader, TensorInfo, read_metadata, scan_gguf

__all__ = [
    "COMPLETE_MARKER",
    "CONVERTER_VERSION",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_TENSOR_TYPES",
    "TEMP_INFIX",
    "GGUFHeader",
    "Progress",
    "TensorInfo",
    "concrete_dtype",
    "convert_gguf",
    "default_dtype",
    "read_metadata",
    "run_convert_cli",
    "scan_gguf",
    "temp_dir_prefix",
]
