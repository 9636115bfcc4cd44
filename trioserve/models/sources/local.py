"""`--model PATH`: an mlx-lm directory used in place, or a GGUF file converted into the cache."""

from __future__ import annotations

from pathlib import Path

from trioserve.models.errors import ModelNotFoundError
from trioserve.models.gguf import Progress
from trioserve.models.sources import ResolvedModel

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """True for a file that starts with the GGUF magic, whatever its name (an Ollama blob
    has no `.gguf` suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_local(
    path: Path, dtype: str, cache_dir: Path | None, progress: Progress | None
) -> ResolvedModel:
    """A local path: a GGUF file (converted), else it must be an mlx-lm directory."""
    from trioserve.models.registry import check_model_dir

    if path.is_file() and (path.suffix.lower() == ".gguf" or is_gguf_file(path)):
        from trioserve.models.sources.gguf_file import resolve_gguf_file

        return resolve_gguf_file(path, dtype, cache_dir, progress)
    if not path.exists() and path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(path, "no such GGUF file")
    if path.is_file():
        raise ModelNotFoundError(
            path, "is neither an mlx-lm model directory nor a GGUF file (no GGUF magic)"
        )
    model_dir = check_model_dir(path)
    return ResolvedModel(model_dir, model_dir.name or model_dir.resolve().name, "local")
