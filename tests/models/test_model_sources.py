"""`--model` in each of its forms, through the real resolution code (no mock of
huggingface_hub): a Hugging Face cache and an Ollama models folder laid out here the way
those tools write them, holding the embedded SmolLM2 model; a .gguf path; a local folder."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from trioserve.models import ModelNotFoundError, default_model_name
from trioserve.models import registry as registry_module
from trioserve.models.errors import ModelSourceError
from trioserve.models.gguf import COMPLETE_MARKER
from trioserve.models.registry import gguf_sha256
from trioserve.models.sources import ResolvedModel, is_hub_spec, resolve
from trioserve.models.sources.ollama import models_dirs, parse_name
from trioserve.testing import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


# -- layouts -----------------------------------------------------------------------------


def lay_out_hub_repo(
    hub: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT, ref: str = "main"
) -> Path:
    """`repo_id` in a huggingface_hub cache: refs/<ref> holds the commit, snapshots/<commit>/
    holds relative symlinks into blobs/<etag> (here: symlinks to the real files)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        # LFS files are stored under their sha256, small ones under their git blob id.
        etag = (
            gguf_sha256(source)
            if name.endswith(".gguf")
            else hashlib.sha1(f"{repo_id}/{name}".encode()).hexdigest()
        )
        blob = repo / "blobs" / etag
        if not blob.exists():
            blob.symlink_to(source)
        (snapshot / name).symlink_to(Path("../../blobs") / etag)
    return snapshot


def model_files(model_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in model_dir.iterdir() if p.is_file()}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, offline, with no other cache variable in the way."""
    home = tmp_path / "hf-home"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, model_dir, gguf_path) -> Path:
    """A conversion cache that already holds the embedded model's conversion (a link to the
    user cache's), so a form that reaches the same GGUF content reuses it, converting
    nothing."""
    cache = tmp_path_factory.mktemp("conversions")
    digest16 = gguf_sha256(gguf_path, cache)[:16]
    (cache / f"{default_model_name()}-{digest16}-float32").symlink_to(model_dir)
    return cache


@pytest.fixture
def count_conversions(monkeypatch) -> list[Path]:
    """The real converter, with its calls recorded (the GGUF each was asked to convert)."""
    calls: list[Path] = []
    real = registry_module.convert_gguf

    def convert(gguf, out_dir, *args, **kwargs):
        calls.append(Path(gguf))
        return real(gguf, out_dir, *args, **kwargs)

    monkeypatch.setattr(registry_module, "convert_gguf", convert)
    return calls


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and message.strip() == message
    return message


# -- the dispatcher ------------------------------------------------------------------------


def test_no_model_is_the_embedded_default(model_dir):
    assert resolve(None) == ResolvedModel(model_dir, default_model_name(), "default")


def test_auto_dtype_is_float32_on_the_cpu(model_dir):
    # model_dir is the float32 conversion; "auto" on this CPU-only build picks the same one.
    assert resolve(None, dtype="auto").path == model_dir
    assert model_dir.name.endswith("-float32")


def test_a_local_directory_is_used_in_place(model_dir):
    resolved = resolve(str(model_dir))
    assert resolved == ResolvedModel(model_dir, model_dir.name, "local")
    assert resolve(model_dir).path == model_dir  # a Path is always a path


def test_missing_paths_say_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve("./not/here")  # './' : a path, never a repo id
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        resolve(str(tmp_path / "model.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="nor a GGUF file") as info:
        resolve(str(tmp_path / "notes.txt"))
    one_line(info.value)


def test_spec_shapes():
    for spec in ("mlx-community/Qwen3-4B-4bit", "owner/name@main", f"o/n@{COMMIT}", "o/n/x.gguf"):
        assert is_hub_spec(spec), spec
    for spec in ("name", "/abs/path", "a/b/c", "ollama:llama3", "o/n@", "o/n@a@b"):
        assert not is_hub_spec(spec), spec


# -- Hugging Face --------------------------------------------------------------------------


def test_hub_repo_id_resolves_from_the_cache_offline(hf_home, model_dir):
    snapshot = lay_out_hub_repo(hf_home / "hub", "owner/smol", model_files(model_dir))
    for spec in ("owner/smol", "owner/smol@main", f"owner/smol@{COMMIT}"):
        resolved = resolve(spec)
        assert resolved.source == "hub" and resolved.name == "owner/smol", spec
        assert resolved.path == snapshot, spec  # huggingface_hub's snapshot dir, in place
        assert (resolved.path / "config.json").read_bytes() == (
            model_dir / "config.json"
        ).read_bytes()


def test_hub_revisions_pick_their_snapshot(hf_home, model_dir):
    lay_out_hub_repo(hf_home / "hub", "owner/smol", model_files(model_dir))
    dev = lay_out_hub_repo(
        hf_home / "hub", "owner/smol", model_files(model_dir), OTHER_COMMIT, ref="dev"
    )
    assert resolve("owner/smol@dev").path == dev
    assert resolve(f"owner/smol@{OTHER_COMMIT}").path == dev
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache"):
        resolve("owner/smol@v2")


def test_hub_cache_dir_follows_hf_hub_cache(hf_home, tmp_path, monkeypatch, model_dir):
    elsewhere = tmp_path / "elsewhere"
    snapshot = lay_out_hub_repo(elsewhere, "owner/smol", model_files(model_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    assert resolve("owner/smol").path == snapshot


def test_uncached_repo_offline_is_one_clear_line(hf_home):
    with pytest.raises(ModelSourceError) as info:
        resolve("owner/missing")
    message = one_line(info.value)
    assert message.startswith("cannot find model 'owner/missing': ")
    assert "not in the Hugging Face cache" in message and f"HF_HOME={hf_home}" in message
    assert "offline mode" in message and "HF_HUB_OFFLINE=1" in message
    assert "`hf download owner/missing`" in message and "local" in message


def test_uncached_repo_with_the_hub_unreachable_fails_fast(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # closed: refused
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    for spec in ("owner/missing", "owner/missing/model.Q4_0.gguf"):
        start = time.monotonic()
        with pytest.raises(ModelSourceError) as info:
            resolve(spec)
        assert time.monotonic() - start < 15, spec
        message = one_line(info.value)
        assert "not in the Hugging Face cache" in message and "unreachable" in message
        assert "127.0.0.1" in message and "hf download owner/missing" in message


def test_cached_repo_is_used_when_the_hub_is_unreachable(hf_home, monkeypatch, model_dir):
    snapshot = lay_out_hub_repo(hf_home / "hub", "owner/smol", model_files(model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert resolve("owner/smol").path == snapshot


def test_an_existing_path_wins_over_a_repo_id(hf_home, tmp_path, monkeypatch, model_dir):
    lay_out_hub_repo(hf_home / "hub", "owner/smol", model_files(model_dir))
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "smol").symlink_to(model_dir)
    monkeypatch.chdir(tmp_path)
    resolved = resolve("owner/smol")
    assert resolved.source == "local" and resolved.path == Path("owner/smol")


def test_invalid_repo_id_is_refused(hf_home):
    with pytest.raises(ModelSourceError, match="not a valid Hugging Face repo id") as info:
        resolve("owner/bad--name")
    one_line(info.value)


def test_a_gguf_repo_points_at_its_file_and_the_file_form_converts(
    hf_home, gguf_path, conversions, count_conversions
):
    lay_out_hub_repo(
        hf_home / "hub", "owner/smol-gguf", {"README.md": gguf_path, "smol.Q4_1.gguf": gguf_path}
    )
    with pytest.raises(ModelSourceError) as info:
        resolve("owner/smol-gguf")
    message = one_line(info.value)
    assert "not an mlx-lm model directory" in message
    assert "`owner/smol-gguf/smol.Q4_1.gguf`" in message

    resolved = resolve("owner/smol-gguf/smol.Q4_1.gguf@main", cache_dir=conversions)
    assert resolved.name == "owner/smol-gguf/smol.Q4_1.gguf" and resolved.source == "hub"
    # Same content as the embedded model: its conversion is reused, nothing converts.
    assert resolved.path.name.startswith(default_model_name()) and count_conversions == []
    with pytest.raises(ModelSourceError, match="no file other.gguf in owner/smol-gguf"):
        resolve("owner/smol-gguf/other.gguf")


# -- a .gguf path --------------------------------------------------------------------------


def test_gguf_file_converts_once_then_reuses(tmp_path, gguf_path, count_conversions):
    cache = tmp_path / "cache"
    before = gguf_path.stat()
    lines: list[str] = []
    resolved = resolve(str(gguf_path), cache_dir=cache, progress=lines.append)
    assert resolved.source == "gguf" and resolved.name == gguf_path.stem
    assert resolved.path.parent == cache and (resolved.path / COMPLETE_MARKER).is_file()
    assert resolved.path.name.endswith(f"-{gguf_sha256(gguf_path)[:16]}-float32")
    assert count_conversions == [gguf_path]
    assert any(line.startswith("converting ") for line in lines), lines
    assert any(line.startswith("converted in ") for line in lines), lines
    listing = sorted(p.name for p in cache.iterdir())

    lines.clear()
    start = time.monotonic()
    again = resolve(str(gguf_path), cache_dir=cache, progress=lines.append)
    assert time.monotonic() - start < 2.0  # the content hash is remembered: no re-read
    assert again == resolved and lines == [] and count_conversions == [gguf_path]
    assert sorted(p.name for p in cache.iterdir()) == listing
    after = gguf_path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def test_renamed_gguf_reuses_the_conversion_of_the_same_content(
    tmp_path, gguf_path, conversions, count_conversions
):
    other = tmp_path / "renamed.gguf"
    other.symlink_to(gguf_path)
    resolved = resolve(str(other), cache_dir=conversions)
    assert resolved.name == "renamed" and count_conversions == []
    assert resolved.path.name.startswith(default_model_name())


# -- Ollama --------------------------------------------------------------------------------


def _blob(models: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (models / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def lay_out_ollama(models: Path, gguf: Path, names: list[tuple[str, ...]]) -> Path:
    """An Ollama models folder: the GGUF linked as blobs/sha256-<its sha256> (not copied),
    and a manifest (config, model, template, params layers) for each (host, ns, model, tag).
    Returns the blob."""
    (models / "blobs").mkdir(parents=True, exist_ok=True)
    digest = gguf_sha256(gguf)
    blob = models / "blobs" / f"sha256-{digest}"
    if not blob.exists():
        try:
            os.link(gguf, blob)
        except OSError:  # another file system
            blob.symlink_to(gguf)
    config = _blob(models, b'{"model_format":"gguf","model_family":"llama"}')
    template = _blob(models, b"{{ .System }}\n{{ .Prompt }}")  # Go, not Jinja: ignored
    params = _blob(models, b'{"stop":["<|im_end|>"]}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": f"sha256:{digest}",
                "size": gguf.stat().st_size,
            },
            {"mediaType": "application/vnd.ollama.image.template", **template},
            {"mediaType": "application/vnd.ollama.image.params", **params},
        ],
    }
    for parts in names:
        path = models.joinpath("manifests", *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
    return blob


NAMES = [
    ("registry.ollama.ai", "library", "smollm2", "135m"),
    ("registry.ollama.ai", "library", "smol", "latest"),
    ("registry.ollama.ai", "someone", "smol", "q4"),
    ("registry.example.com", "team", "smol", "v1"),
]


@pytest.fixture
def ollama_models(tmp_path, monkeypatch, gguf_path) -> Path:
    models = tmp_path / "ollama-models"
    lay_out_ollama(models, gguf_path, NAMES)
    monkeypatch.setenv("OLLAMA_MODELS", str(models))
    return models


def test_ollama_names_parse_with_ollama_s_defaults():
    assert parse_name("llama3") == ("registry.ollama.ai", "library", "llama3", "latest")
    assert parse_name("qwen2.5-coder:1.5b") == (
        "registry.ollama.ai",
        "library",
        "qwen2.5-coder",
        "1.5b",
    )
    assert parse_name("user/model:tag") == ("registry.ollama.ai", "user", "model", "tag")
    assert parse_name("host:5000/ns/m") == ("host:5000", "ns", "m", "latest")
    for bad in ("", "a/b/c/d", "x:", "/x"):
        with pytest.raises(ValueError):
            parse_name(bad)


def test_ollama_models_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_dirs() == [
        tmp_path / ".ollama" / "models",
        Path("/usr/share/ollama/.ollama/models"),
    ]


def test_ollama_model_converts_once_and_leaves_the_blob_alone(
    ollama_models, tmp_path, gguf_path, count_conversions
):
    blob = ollama_models / "blobs" / f"sha256-{gguf_sha256(gguf_path)}"
    before = blob.stat()
    cache = tmp_path / "cache"
    lines: list[str] = []
    resolved = resolve("ollama:smollm2:135m", cache_dir=cache, progress=lines.append)
    assert resolved.name == "smollm2:135m" and resolved.source == "ollama"
    assert resolved.path.parent == cache and (resolved.path / COMPLETE_MARKER).is_file()
    assert count_conversions == [blob]  # the blob itself, read in place
    assert any("converting" in line for line in lines)
    # The digest is the key: no hash of the blob was computed (nothing remembered).
    assert not (cache / "gguf-hashes.json").exists()
    listing = sorted(p.name for p in cache.iterdir())

    again = resolve("ollama:smollm2:135m", cache_dir=cache)
    assert again == resolved and count_conversions == [blob]
    assert sorted(p.name for p in cache.iterdir()) == listing
    after = blob.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert not list(blob.parent.glob(".*"))  # nothing written next to the blobs


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("ollama:smol", "smol"),  # tag: latest
        ("ollama:smol:latest", "smol:latest"),
        ("ollama:someone/smol:q4", "someone/smol:q4"),
        ("ollama:registry.example.com/team/smol:v1", "registry.example.com/team/smol:v1"),
        ("ollama:SmolLM2:135M", "SmolLM2:135M"),  # Ollama's names ignore case
    ],
)
def test_ollama_name_forms(ollama_models, conversions, count_conversions, spec, name):
    resolved = resolve(spec, cache_dir=conversions)
    assert resolved.name == name and resolved.source == "ollama"
    assert resolved.path.name.startswith(default_model_name()) and count_conversions == []


def test_missing_ollama_model_lists_what_is_there(ollama_models):
    with pytest.raises(ModelSourceError) as info:
        resolve("ollama:llama3")
    message = one_line(info.value)
    assert message.startswith("cannot find model 'ollama:llama3': ")
    assert str(ollama_models) in message and "llama3:latest" in message
    assert "smollm2:135m" in message and "someone/smol:q4" in message
    assert "`ollama pull llama3`" in message


def test_missing_ollama_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "absent"))
    with pytest.raises(ModelSourceError, match="no such folder") as info:
        resolve("ollama:llama3")
    assert "ollama pull llama3" in one_line(info.value)


def test_ollama_blob_of_the_wrong_size_is_refused(ollama_models):
    manifest = ollama_models / "manifests/registry.ollama.ai/library/smollm2/135m"
    data = json.loads(manifest.read_text())
    data["layers"][0]["size"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelSourceError) as info:
        resolve("ollama:smollm2:135m")
    message = one_line(info.value)
    assert "bytes but its manifest says" in message and "ollama pull smollm2:135m" in message


def test_ollama_manifest_problems_are_one_line(ollama_models):
    manifest = ollama_models / "manifests/registry.ollama.ai/library/smollm2/135m"
    data = json.loads(manifest.read_text())
    model_layer = data["layers"].pop(0)
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelSourceError, match="has no model layer"):
        resolve("ollama:smollm2:135m")
    manifest.write_text("{not json")
    with pytest.raises(ModelSourceError, match="cannot read Ollama's manifest"):
        resolve("ollama:smollm2:135m")
    data["layers"].insert(0, model_layer)
    manifest.write_text(json.dumps(data))
    blob = ollama_models / "blobs" / model_layer["digest"].replace(":", "-")
    blob.unlink()
    with pytest.raises(ModelSourceError, match="is missing") as info:
        resolve("ollama:smollm2:135m")
    one_line(info.value)
    with pytest.raises(ModelSourceError, match="not an Ollama model name"):
        resolve("ollama:")


def test_cache_dir_unwritable_is_one_line(tmp_path, gguf_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ModelNotFoundError, match="cannot create the model cache") as info:
        resolve(str(gguf_path), cache_dir=blocker / "cache")
    one_line(info.value)
