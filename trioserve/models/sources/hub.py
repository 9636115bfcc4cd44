"""`--model owner/name[@revision]`: a Hugging Face repo, through huggingface_hub's own cache.

huggingface_hub does the work: the standard cache layout (`models--owner--name/snapshots/
<commit>`), tokens (HF_TOKEN or `hf auth login`), its progress bars, and the offline
fallback to a cached snapshot. Only what an mlx-lm directory needs is downloaded.

huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT into
`huggingface_hub.constants` once, when first imported (mlx-lm imports it early). A server is
a fresh process, so its environment is what counts; still, the cache, the offline switch and
the endpoint are read here from the environment at each call, so they mean the same in a
process that set them late (tests) and the error can name the cache that was searched.
"""

from __future__ import annotations

import os
from pathlib import Path

from trioserve.models.errors import ModelSourceError
from trioserve.models.gguf import Progress
from trioserve.models.sources import ResolvedModel

# What an mlx-lm directory needs (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS): configs, weights,
# tokenizer files, chat templates, custom code. Never the .gguf/.bin/.pt copies some repos
# also hold.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


def _env_true(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return raw.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) now, else what huggingface_hub read."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = _env_true(name)
        if value is not None:
            return value
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache as the environment says now (same rules as its constants)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cache_words(cache: Path) -> str:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        if os.environ.get(name):
            return f"{cache} ({name}={os.environ[name]})"
    return f"{cache} (set HF_HOME or HF_HUB_CACHE to use another)"


def resolve_hub(
    repo_id: str,
    revision: str | None,
    filename: str | None,
    dtype: str,
    cache_dir: Path | None,
    progress: Progress | None,
) -> ResolvedModel:
    """The repo's snapshot (an mlx-lm directory), or with `filename` that GGUF file of the
    repo converted into trioserve's cache. Raises ModelSourceError, one line."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    spec = repo_id + (f"/{filename}" if filename else "") + (f"@{revision}" if revision else "")
    cache = hub_cache_dir()
    offline = hub_offline()
    common = {
        "revision": revision,
        "cache_dir": str(cache),
        "local_files_only": offline,
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
    }
    get = f"hf download {repo_id}" + (f" {filename}" if filename else "")
    get += f" --revision {revision}" if revision else ""
    try:
        # One GGUF also goes through snapshot_download: its first request (repo_info) fails
        # at once when the Hub is unreachable, where hf_hub_download retries for ~25 s.
        patterns = [filename] if filename else ALLOW_PATTERNS
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, **common))
    except hf_errors.HFValidationError as exc:
        raise ModelSourceError(
            spec, f"not a local path, and not a valid Hugging Face repo id ({exc})"
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise ModelSourceError(
            spec,
            f"{repo_id} is a gated repo: accept its terms on huggingface.co, then log in "
            "with `hf auth login` or set HF_TOKEN",
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise ModelSourceError(
            spec,
            f"the Hub has no revision {revision!r} of {repo_id}; check the branch, tag "
            "or commit after '@'",
        ) from exc
    except (hf_errors.RepositoryNotFoundError, hf_errors.RemoteEntryNotFoundError) as exc:
        what = (
            f"no file {filename} in {repo_id}"
            if isinstance(exc, hf_errors.RemoteEntryNotFoundError)
            else f"no repo {repo_id} on the Hub, or it is private"
        )
        raise ModelSourceError(
            spec,
            f"not a local path, and {what} (HTTP {_status(exc)}); check the name, or log "
            "in with `hf auth login` or set HF_TOKEN for a private repo",
        ) from exc
    except hf_errors.IncompleteSnapshotError as exc:
        raise ModelSourceError(
            spec,
            f"the cached snapshot in {_cache_words(cache)} is incomplete and the Hub cannot "
            f"be reached to finish it; run `{get}` on a machine with network",
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        why = (
            "the Hub is unreachable (offline mode: HF_HUB_OFFLINE=1)"
            if offline
            else f"the Hub is unreachable ({_endpoint()}: {_cause(exc)})"
        )
        raise ModelSourceError(
            spec,
            f"not a local path, not in the Hugging Face cache {_cache_words(cache)}, and "
            f"{why}; run `{get}` on a machine with network (then copy that cache here), "
            "or pass a local mlx-lm directory or .gguf file",
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise ModelSourceError(
            spec,
            f"the Hub answered HTTP {_status(exc)} ({_endpoint()}); retry later, or "
            f"run `{get}` elsewhere and copy the cache",
        ) from exc
    except OSError as exc:  # a full disk or unwritable cache while downloading
        raise ModelSourceError(
            spec, f"cannot download into {cache}: {exc.strerror or exc}"
        ) from exc
    except Exception as exc:  # e.g. a proxy error, which huggingface_hub re-raises as is
        raise ModelSourceError(
            spec, f"the Hub lookup failed ({_endpoint()}: {type(exc).__name__}: {exc})"
        ) from exc

    if filename:
        if not (path / filename).is_file():
            ggufs = sorted(str(p.relative_to(path)) for p in path.rglob("*.gguf"))
            ggufs = ggufs or _remote_ggufs(repo_id, revision)
            found = f" (its GGUF files: {', '.join(ggufs[:8])})" if ggufs else ""
            raise ModelSourceError(
                spec,
                f"no file {filename} in {repo_id}{found}; check the name, or run `{get}` on "
                "a machine with network",
            )
        return _convert_hub_gguf(spec, path / filename, dtype, cache_dir, progress)
    from trioserve.models.registry import is_model_dir

    if not is_model_dir(path):
        ggufs = sorted(p.name for p in path.glob("*.gguf")) or _remote_ggufs(repo_id, revision)
        hint = (
            f"it holds GGUF files: pass one as `{repo_id}/{ggufs[0]}`"
            if ggufs
            else "pass a repo with config.json, model*.safetensors and tokenizer files "
            "(e.g. from mlx-community), or a local path"
        )
        raise ModelSourceError(
            spec, f"the repo's snapshot {path} is not an mlx-lm model directory; {hint}"
        )
    return ResolvedModel(path, repo_id, "hub")


def _convert_hub_gguf(
    spec: str, path: Path, dtype: str, cache_dir: Path | None, progress: Progress | None
) -> ResolvedModel:
    """One GGUF of a repo, converted into trioserve's cache like any GGUF."""
    from trioserve.models.registry import convert_cached

    # Large (LFS) files are stored as blobs/<sha256>: the cache key without re-hashing.
    blob = path.resolve()
    digest = blob.name if len(blob.name) == 64 and blob.parent.name == "blobs" else None
    try:
        int(digest or "", 16)
    except ValueError:
        digest = None
    name = spec.split("@", 1)[0]
    out_dir = convert_cached(path, Path(path.name).stem, dtype, cache_dir, progress, sha256=digest)
    return ResolvedModel(out_dir, name, "hub")


def _remote_ggufs(repo_id: str, revision: str | None) -> list[str]:
    """The repo's .gguf files, when the Hub can be asked (only to word an error)."""
    if hub_offline():
        return []
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        return sorted(
            f for f in api.list_repo_files(repo_id, revision=revision) if f.endswith(".gguf")
        )
    except Exception:  # any failure: the error is worded without the list
        return []


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _status(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "?"))


def _cause(exc: BaseException) -> str:
    """The connection error under huggingface_hub's wrapper, in a few words."""
    inner = exc.__cause__ or exc.__context__ or exc
    text = " ".join(str(inner).split())[:160]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
