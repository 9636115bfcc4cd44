"""The real server started with `--model` in each of its four forms (a Hugging Face repo id
from an offline hub cache, an Ollama name from an Ollama models folder, a .gguf path, a local
mlx-lm directory), all holding the embedded SmolLM2: each answers the capital of France and
serves the model under the form's name. One conversion cache (XDG_CACHE_HOME) is shared by
the module, so the GGUF is converted once, by `trioserve prepare`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.models.test_model_sources import lay_out_hub_repo, lay_out_ollama, model_files
from trioserve.models.registry import default_gguf_path
from trioserve.testing import running_server

QUESTION = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 24,
}
TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[2]


def trioserve_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trioserve", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def homes(tmp_path_factory, model_dir) -> dict:
    """The environment of every server here: an offline HF_HOME holding `owner/smol`, an
    Ollama folder holding `smollm2:135m`, and an empty conversion cache, then filled by
    `trioserve prepare --model FILE.gguf` (its output kept for the test of prepare)."""
    base = tmp_path_factory.mktemp("model-forms")
    gguf = default_gguf_path()
    lay_out_hub_repo(base / "hf" / "hub", "owner/smol", model_files(model_dir))
    lay_out_ollama(base / "ollama", gguf, [("registry.ollama.ai", "library", "smollm2", "135m")])
    env = {
        "XDG_CACHE_HOME": str(base / "xdg"),
        "HF_HOME": str(base / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OLLAMA_MODELS": str(base / "ollama"),
    }
    prepared = trioserve_cli("prepare", "--model", str(gguf), env=env)
    assert prepared.returncode == 0, prepared.stderr
    return {"env": env, "cache": base / "xdg" / "trioserve" / "models", "prepared": prepared}


def test_prepare_converts_once_and_prints_the_directory(homes):
    first = homes["prepared"]
    out_dir = Path(first.stdout.strip())
    assert out_dir.parent == homes["cache"] and (out_dir / "model.safetensors").is_file()
    steps = first.stderr.splitlines()
    assert any(s.startswith("converting ") for s in steps), first.stderr  # why it is slow
    assert any(s.startswith("converted in ") for s in steps), first.stderr
    # The Ollama blob is the same GGUF: the same conversion, nothing converted again.
    again = trioserve_cli("prepare", "--model", "ollama:smollm2:135m", env=homes["env"])
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == out_dir and "converting" not in again.stderr


@pytest.mark.parametrize("form", ["hub", "ollama", "gguf", "local", "renamed"])
def test_each_form_serves_and_answers(homes, model_dir, tmp_path, form):
    gguf = default_gguf_path()
    model, name = {
        "hub": ("owner/smol", "owner/smol"),
        "ollama": ("ollama:smollm2:135m", "smollm2:135m"),
        "gguf": (str(gguf), gguf.stem),
        "local": (str(model_dir), model_dir.name),
        "renamed": ("owner/smol", "my-model"),  # --served-model-name wins over the repo id
    }[form]
    args = ("--model", model, "--parallel", "1", "--no-ui", "--prefix-cache-mb", "0")
    if form == "renamed":
        args += ("--served-model-name", name)
    with running_server(*args, log_path=tmp_path / "server.log", env=homes["env"]) as server:
        models = httpx.get(server.v1 + "/models", timeout=TIMEOUT_S).json()
        assert [m["id"] for m in models["data"]] == [name]
        response = httpx.post(server.v1 + "/chat/completions", json=QUESTION, timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == name
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert "converting" not in server.log_text()  # the module's conversion, reused


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("owner/absent", ["not in the Hugging Face cache", "hf download owner/absent"]),
        ("ollama:llama3", ["smollm2:135m", "ollama pull llama3"]),
    ],
)
def test_a_model_that_cannot_be_found_stops_the_start_with_one_line(homes, model, needles):
    done = trioserve_cli("serve", "--port", "1", "--model", model, env=homes["env"])
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot find model '{model}': ")
    for needle in needles:
        assert needle in line
