"""What `--model` names, as an mlx-lm directory to load and a name to serve it under.

Four forms, tried in this order (the first that applies wins):

1. nothing: the embedded SmolLM2-135M-Instruct, converted once into the cache;
2. an existing path: an mlx-lm directory (used in place) or a `.gguf` file (converted once
   into the cache, keyed by content hash and dtype). An existing path wins over the other
   forms, so a local folder `owner/name` is never mistaken for a Hub repo;
3. `ollama:NAME[:TAG]`: a GGUF that Ollama has already pulled, read from its models folder;
4. `owner/name[@revision]`: a Hugging Face repo (through huggingface_hub's cache and
   downloads), or `owner/name/FILE.gguf[@revision]` for one GGUF file of a repo.

Anything else is a path that does not exist. Every failure is a one-line ModelNotFoundError
(usually ModelSourceError) that says what was tried and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trioserve.models.errors import ModelNotFoundError
from trioserve.models.gguf import Progress

# owner/name, optionally /sub/dir/FILE.gguf, optionally @revision (branch, tag or commit).
# HF owners and names: letters, digits, '-', '_', '.'; huggingface_hub checks the rest.
_HUB_SPEC = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:/(?P<file>[^@]+\.gguf))?"
    r"(?:@(?P<revision>[^@\s]+))?"
)
OLLAMA_PREFIX = "ollama:"


@dataclass(frozen=True)
class ResolvedModel:
    """A resolved `--model`: the mlx-lm directory to load and the name clients see."""

    path: Path  # the mlx-lm directory (config.json, *.safetensors, tokenizer)
    name: str  # /v1/models id and the `model` of answers
    source: str  # "default", "local", "gguf", "hub" or "ollama"


def is_hub_spec(spec: str) -> bool:
    """True if `spec` has the shape of `owner/name[@rev]` or `owner/name/FILE.gguf[@rev]`."""
    return _HUB_SPEC.fullmatch(spec) is not None


def default_name(spec: str | Path | None) -> str:
    """The name `resolve(spec)` serves the model under, without resolving it (no download,
    no conversion): what several models are listed as before they are loaded."""
    from trioserve.models import registry

    if spec is None:
        return registry.default_model_name()
    text = str(spec)
    local = Path(text).expanduser()
    is_path = local.exists() or isinstance(spec, Path)
    if not is_path and text.startswith(OLLAMA_PREFIX):
        return text[len(OLLAMA_PREFIX) :]
    if not is_path and _HUB_SPEC.fullmatch(text) and not text.startswith(("/", ".", "~")):
        return text.split("@", 1)[0]  # the repo id, or owner/name/FILE.gguf
    if local.is_file() or (not local.exists() and local.suffix.lower() == ".gguf"):
        return local.stem  # a GGUF file (an Ollama blob is reached through ollama:)
    return local.name or local.resolve().name


def resolve(
    spec: str | Path | None,
    dtype: str = "float32",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ResolvedModel:
    """Resolve one `--model` value (see the module's docstring for the forms and order).

    GGUF sources are converted to `dtype` ("auto": this device's default) into `cache_dir`
    (default: the user's cache) on first use, with a line per step through `progress`.
    Raises ModelNotFoundError (or ConversionError for a GGUF that cannot be converted),
    each one line.
    """
    from trioserve.models import registry
    from trioserve.models.gguf import concrete_dtype

    dtype = concrete_dtype(dtype)
    if spec is None:
        path = registry.convert_default_model(dtype=dtype, cache_dir=cache_dir, progress=progress)
        return ResolvedModel(path, registry.default_model_name(), "default")
    text = str(spec)
    if not text.strip():
        raise ModelNotFoundError(text, "empty --model value")
    local = Path(text).expanduser()
    if local.exists() or isinstance(spec, Path):
        from trioserve.models.sources.local import resolve_local

        return resolve_local(local, dtype, cache_dir, progress)
    if text.startswith(OLLAMA_PREFIX):
        from trioserve.models.sources.ollama import resolve_ollama

        return resolve_ollama(text[len(OLLAMA_PREFIX) :], dtype, cache_dir, progress)
    match = _HUB_SPEC.fullmatch(text)
    if match is not None and not text.startswith(("/", ".", "~")):
        from trioserve.models.sources.hub import resolve_hub

        return resolve_hub(
            match["repo"], match["revision"], match["file"], dtype, cache_dir, progress
        )
    from trioserve.models.sources.local import resolve_local

    return resolve_local(local, dtype, cache_dir, progress)


__all__ = ["OLLAMA_PREFIX", "ResolvedModel", "default_name", "is_hub_spec", "resolve"]
