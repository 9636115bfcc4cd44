"""`--model FILE.gguf`: converted once into the cache (keyed by content hash and dtype)."""

from __future__ import annotations

from pathlib import Path

from trioserve.models.errors import ModelNotFoundError
from trioserve.models.gguf import Progress
from trioserve.models.sources import ResolvedModel


def resolve_gguf_file(
    path: Path,
    dtype: str,
    cache_dir: Path | None,
    progress: Progress | None,
    *,
    name: str | None = None,
    sha256: str | None = None,
    source: str = "gguf",
) -> ResolvedModel:
    """The cached conversion of `path`, served as `name` (default: the file's stem).

    The GGUF is only read. `sha256` (its content digest, when known) skips hashing it.
    """
    from trioserve.models.registry import convert_cached

    if not path.is_file():
        raise ModelNotFoundError(path, "no such GGUF file")
    name = name or path.stem
    out_dir = convert_cached(path, name, dtype, cache_dir, progress, sha256=sha256)
    return ResolvedModel(out_dir, name, source)
