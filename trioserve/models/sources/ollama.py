"""`--model ollama:NAME[:TAG]`: a GGUF that Ollama has already pulled, used read-only.

Ollama keeps a Docker-style (v2) manifest per model at
`<models>/manifests/<host>/<namespace>/<model>/<tag>` (`qwen2.5-coder:1.5b` is
`registry.ollama.ai/library/qwen2.5-coder/1.5b`). Its layer with mediaType
`application/vnd.ollama.image.model` is the GGUF, stored as `<models>/blobs/sha256-<hex>`
and named by its own SHA-256, so that digest is the conversion cache's key as is (only its
size is checked, not re-hashed). The blob is never copied or written.

Other layers are ignored: `application/vnd.ollama.image.template` is a Go text/template,
not Jinja, so the GGUF's own `tokenizer.chat_template` (which the converter keeps) is used;
`...params` (stop words, temperature) and `...system` are Ollama's request defaults, which
trioserve's clients send themselves. A model with an `...adapter` (LoRA) or `...projector`
(vision) layer is served without it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from trioserve.models.errors import ModelSourceError
from trioserve.models.gguf import Progress
from trioserve.models.sources import ResolvedModel

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
# Linux packages run Ollama as the `ollama` user, whose models live here.
SERVICE_MODELS = Path("/usr/share/ollama/.ollama/models")
_DIGEST = re.compile(r"sha256[:-](?P<hex>[0-9a-f]{64})")
_PART = re.compile(r"[A-Za-z0-9][\w.:-]*")  # ':' only in a host's port
_MAX_LISTED = 12


def models_dirs() -> list[Path]:
    """Where to look: $OLLAMA_MODELS alone if set, else the user's and the service's."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", SERVICE_MODELS]


def parse_name(name: str) -> tuple[str, str, str, str]:
    """`[host/][namespace/]model[:tag]` as (host, namespace, model, tag), Ollama's defaults
    filled in. Raises ValueError for a malformed name."""
    path, tag = name, DEFAULT_TAG
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:  # a ':' before the last '/' is a host's port
        path, tag = name[:colon], name[colon + 1 :]
    parts = path.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    if len(parts) != 3 or not all(_PART.fullmatch(p) for p in [*parts, tag]):
        raise ValueError(name)
    host, namespace, model = parts
    return host, namespace, model, tag


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The short name Ollama shows: `llama3:latest`, `user/model:tag`, `host/ns/model:tag`."""
    if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE:
        return f"{model}:{tag}"
    if host == DEFAULT_HOST:
        return f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def list_models(root: Path) -> dict[str, Path]:
    """Every pulled model in `root` by its display name, with its manifest file."""
    found: dict[str, Path] = {}
    manifests = root / "manifests"
    try:
        files = sorted(manifests.glob("*/*/*/*"))
    except OSError:
        return found
    for manifest in files:
        if manifest.is_file() and not manifest.name.startswith("."):
            host, namespace, model, tag = manifest.relative_to(manifests).parts
            found[display_name(host, namespace, model, tag)] = manifest
    return found


def resolve_ollama(
    name: str, dtype: str, cache_dir: Path | None, progress: Progress | None
) -> ResolvedModel:
    """The model Ollama calls `name`, its GGUF blob converted into trioserve's cache."""
    from trioserve.models.sources.gguf_file import resolve_gguf_file

    spec = f"ollama:{name}"
    try:
        parts = parse_name(name)
    except ValueError:
        raise ModelSourceError(
            spec, "not an Ollama model name; write ollama:MODEL[:TAG], e.g. ollama:llama3.2:1b"
        ) from None
    roots = models_dirs()
    manifest = _find_manifest(roots, parts)
    if manifest is None:
        raise ModelSourceError(spec, _not_found(name, parts, roots))
    blob, digest = _model_blob(spec, name, manifest)
    if progress is not None:
        progress(f"ollama:{name} is {blob}")
    return resolve_gguf_file(
        blob, dtype, cache_dir, progress, name=name, sha256=digest, source="ollama"
    )


def _find_manifest(roots: list[Path], parts: tuple[str, str, str, str]) -> Path | None:
    wanted = display_name(*parts)
    for root in roots:
        exact = root.joinpath("manifests", *parts)
        if exact.is_file():
            return exact
    for root in roots:  # Ollama's names are case-insensitive
        for shown, manifest in list_models(root).items():
            if shown.lower() == wanted.lower():
                return manifest
    return None


def _not_found(name: str, parts: tuple[str, str, str, str], roots: list[Path]) -> str:
    searched = [r for r in roots if r.is_dir()] or roots
    available = sorted({n for r in searched for n in list_models(r)})
    if available:
        shown = ", ".join(available[:_MAX_LISTED])
        more = len(available) - _MAX_LISTED
        found = f"found: {shown}" + (f" and {more} more" if more > 0 else "")
    elif any(r.is_dir() for r in roots):
        found = "found no models there"
    else:
        found = "no such folder"
    where = " or ".join(str(r) for r in searched)
    return (
        f"Ollama has not pulled {display_name(*parts)} into {where} ({found}); run "
        f"`ollama pull {name}`, or set OLLAMA_MODELS to the folder Ollama stores models in"
    )


def _model_blob(spec: str, name: str, manifest: Path) -> tuple[Path, str]:
    """The GGUF blob the manifest names, with its SHA-256, after checking its size."""
    repull = f"re-pull it with `ollama pull {name}`"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        layer = next(x for x in layers if x.get("mediaType") == MODEL_MEDIA_TYPE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelSourceError(
            spec, f"cannot read Ollama's manifest {manifest}; {repull}"
        ) from None
    except StopIteration:
        raise ModelSourceError(
            spec,
            f"Ollama's manifest {manifest} has no model layer ({MODEL_MEDIA_TYPE}); {repull}",
        ) from None
    match = _DIGEST.fullmatch(str(layer.get("digest", "")))
    size = layer.get("size")
    if match is None or not isinstance(size, int):
        raise ModelSourceError(
            spec, f"Ollama's manifest {manifest} has a malformed model layer; {repull}"
        )
    digest = match["hex"]
    blobs = manifest.parents[4] / "blobs"
    # sha256-<hex> today; Ollama before 0.1.31 (on Linux and macOS) wrote sha256:<hex>.
    blob = next(
        (b for b in (blobs / f"sha256-{digest}", blobs / f"sha256:{digest}") if b.is_file()),
        blobs / f"sha256-{digest}",
    )
    try:
        actual = blob.stat().st_size
    except OSError:
        raise ModelSourceError(
            spec, f"the model's blob {blob} is missing (an interrupted pull?); {repull}"
        ) from None
    if actual != size:
        raise ModelSourceError(
            spec,
            f"the model's blob {blob} is {actual} bytes but its manifest says {size} "
            f"(an interrupted pull?); {repull}",
        )
    return blob, digest
