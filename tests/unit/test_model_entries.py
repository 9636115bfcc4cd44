"""Several models on the command line and in the environment: the NAME=SOURCE rule, the
list in ServerConfig, the names they are served under, and the checks at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioserve.api.app import create_app
from trioserve.cli import _serve_config, build_parser, main
from trioserve.config import ConfigError, ModelEntry, ServerConfig, parse_model_entry
from trioserve.models.sources import default_name, resolve


@pytest.mark.parametrize(
    ("raw", "entry"),
    [
        ("fast=./models/qwen", ModelEntry("fast", "./models/qwen")),
        ("coder=ollama:qwen2.5-coder:1.5b", ModelEntry("coder", "ollama:qwen2.5-coder:1.5b")),
        ("q3=mlx-community/Qwen3-4B-4bit", ModelEntry("q3", "mlx-community/Qwen3-4B-4bit")),
        ("ollama:llama3", ModelEntry(None, "ollama:llama3")),  # ':' before any '='
        ("owner/name", ModelEntry(None, "owner/name")),
        ("./dir=1", ModelEntry(None, "./dir=1")),  # '/' before the '=': a path
        ("owner/a=b", ModelEntry(None, "owner/a=b")),
        ("name=", ModelEntry(None, "name=")),  # nothing after it: not a split
        ("=x", ModelEntry(None, "=x")),
    ],
)
def test_name_equals_source_is_split_only_after_a_plain_name(raw, entry):
    assert parse_model_entry(raw) == entry


def test_an_existing_path_with_an_equals_sign_is_a_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a=b").mkdir()
    assert parse_model_entry("a=b") == ModelEntry(None, "a=b")


def test_repeated_model_flags_make_the_list():
    parser = build_parser()
    several = _serve_config(parser.parse_args(["serve", "--model", "a=x", "--model", "y"]))
    assert several.models == ("a=x", "y") and several.model is None
    assert several.model_entries() == [ModelEntry("a", "x"), ModelEntry(None, "y")]
    assert several.max_loaded_models == 1 and several.model_ttl_s == 0
    one = _serve_config(parser.parse_args(["serve", "--model", "a=x"]))
    assert one.models == () and one.model_entries() == [ModelEntry("a", "x")]
    default = _serve_config(parser.parse_args(["serve"]))
    assert default.model_entries() == [ModelEntry(None, None)]
    tuned = parser.parse_args(["serve", "--max-loaded-models", "2", "--model-ttl", "300"])
    assert (_serve_config(tuned).max_loaded_models, _serve_config(tuned).model_ttl_s) == (2, 300)


def test_the_environment_takes_a_list():
    config = ServerConfig.from_env({"TRIOSERVE_MODEL": "a=./one, b=ollama:two:7b\nc"})
    assert config.models == ("a=./one", "b=ollama:two:7b", "c") and config.model is None
    one = ServerConfig.from_env({"TRIOSERVE_MODEL": "fast=./one"})
    assert one.models == () and one.model_entries() == [ModelEntry("fast", "./one")]
    ttl = ServerConfig.from_env({"TRIOSERVE_MODEL_TTL_S": "60", "TRIOSERVE_MAX_LOADED_MODELS": "2"})
    assert (ttl.model_ttl_s, ttl.max_loaded_models) == (60, 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-loaded-models", "0"], "--max-loaded-models must be at least 1, got 0"),
        (["--model-ttl", "-1"], "--model-ttl must be a number of seconds, 0 or more"),
        (
            ["--model", "a=x", "--model", "b=y", "--served-model-name", "n"],
            "--served-model-name names one model; with several, write --model NAME=SOURCE",
        ),
    ],
)
def test_bad_values_stop_the_start_with_one_line(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_two_models_under_one_name_are_refused(model_dir):
    with pytest.raises(ConfigError, match="serve two models as 'x'"):
        create_app(ServerConfig(models=(f"x={model_dir}", f"x={model_dir}")))


def test_the_default_name_is_the_name_resolve_serves(model_dir):
    assert default_name(model_dir) == resolve(model_dir).name
    assert default_name(None) == resolve(None).name
    assert default_name("ollama:qwen2.5:1.5b") == "qwen2.5:1.5b"
    assert default_name("owner/name@main") == "owner/name"
    assert default_name("owner/name/file.Q4_0.gguf") == "owner/name/file.Q4_0.gguf"
    assert default_name(Path("/nonexistent/model.gguf")) == "model"


async def test_several_models_list_before_they_load(model_dir):
    # The app without its lifespan: nothing loads, every model is listed as unloaded.
    app = create_app(ServerConfig(models=(f"a={model_dir}", str(model_dir))))
    client = app.test_client()
    listed = (await (await client.get("/v1/models")).get_json())["data"]
    assert [(m["id"], m["status"]) for m in listed] == [
        ("a", "unloaded"),
        (model_dir.name, "unloaded"),
    ]
    health = await client.get("/health")
    assert health.status_code == 503  # the pool is not running yet
    body = await health.get_json()
    assert body["model"] == "a" and [m["status"] for m in body["models"]] == ["unloaded"] * 2
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    missing = await client.post("/v1/chat/completions", json=ask)
    assert missing.status_code == 400
    assert (await missing.get_json())["error"]["code"] == "model_required"
    waiting = await client.post("/v1/chat/completions", json={**ask, "model": "a"})
    assert waiting.status_code == 503  # not serving: no load can start
    assert (await waiting.get_json())["error"]["code"] == "server_shutdown"
