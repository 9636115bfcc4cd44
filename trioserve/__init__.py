"""trioserve: a local, OpenAI-compatible LLM server on Trio and MLX."""

# Must run before anything imports mlx: binds MLX to OpenBLAS instead of its slow reference BLAS.
from trioserve.blas import preload_fast_blas

preload_fast_blas()

__version__ = "0.1.0"

__all__ = ["__version__"]
