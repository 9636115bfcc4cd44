"""Start-up configuration: every value the server cannot run with is a ``ConfigError`` that
names the setting (the field, the environment variable or the flag), before any model loads;
``trioserve serve`` prints it on one line and exits 2."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from trioserve.cli import _serve_config, build_parser, main
from trioserve.config import MIN_CTX_SIZE, ConfigError, ServerConfig

BAD = [
    ({"parallel": 0}, "parallel must be at least 1, got 0"),
    ({"parallel": -3}, "parallel must be at least 1"),
    ({"port": 0}, "port must be between 1 and 65535"),
    ({"port": 65536}, "port must be between 1 and 65535"),
    ({"prefill_step_size": 0}, "prefill_step_size must be at least 1"),
    ({"solo_prefill_step_size": -1}, "solo_prefill_step_size must be at least 0"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"ctx_size": MIN_CTX_SIZE - 1}, f"ctx_size must be at least {MIN_CTX_SIZE}"),
    ({"ctx_size": 0}, "ctx_size must be at least"),
    ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be a number of seconds above 0"),
    ({"heartbeat_interval_s": -1.0}, "heartbeat_interval_s"),
    ({"heartbeat_interval_s": math.nan}, "heartbeat_interval_s"),
    ({"sse_keepalive_s": -1}, "sse_keepalive_s"),
    ({"send_timeout_s": -0.5}, "send_timeout_s must be a number of seconds, 0 or more"),
    ({"send_timeout_s": math.inf}, "send_timeout_s"),
    ({"queue_timeout_s": 0}, "queue_timeout_s must be a number of seconds above 0"),
    ({"queue_timeout_s": -1}, "queue_timeout_s"),
    ({"shutdown_grace_s": -1}, "shutdown_grace_s"),
    ({"max_queue": -1}, "max_queue must be at least 0"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"prefix_cache_mb": -1}, "prefix_cache_mb"),
    ({"default_temperature": 3.0}, "default_temperature"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"log_level": "loud"}, "log_level must be one of"),
    ({"host": ""}, "host must not be empty"),
    ({"parallel": "8"}, "parallel must be an integer"),
    ({"parallel": True}, "parallel must be an integer"),
    ({"heartbeat_interval_s": "2"}, "heartbeat_interval_s must be a number"),
    ({"allowed_hosts": ("ok.example", "")}, "allowed_hosts"),
    ({"allowed_hosts": ("http://proxy.example/",)}, "not URLs"),
    ({"allowed_hosts": "proxy.example"}, "allowed_hosts must be a list"),
    ({"cors_origins": ("a b",)}, "cors_origins"),
    ({"blas_threads": "0"}, "blas_threads must be auto or a count from 1 to 256"),
    ({"blas_threads": "two"}, "blas_threads must be auto or a count"),
    ({"blas_threads": 2}, "blas_threads must be a string"),
]


@pytest.mark.parametrize(("values", "needle"), BAD)
def test_bad_values_are_config_errors(values, needle):
    with pytest.raises(ConfigError) as info:
        ServerConfig(**values)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.field == next(iter(values))


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"parallel": 1, "port": 1, "max_tokens": 1, "prefill_step_size": 1},
        {"port": 65535, "solo_prefill_step_size": 0},  # 0: the same as prefill_step_size
        {"ctx_size": MIN_CTX_SIZE},
        {"ctx_size": 131072},
        {"send_timeout_s": 0, "shutdown_grace_s": 0, "sse_keepalive_s": 0},  # 0: off
        {"max_queue": 0, "queue_timeout_s": None, "prefix_cache_mb": 0},
        {"max_queue": None, "queue_timeout_s": 0.5, "heartbeat_interval_s": 0.01},
        {"allowed_hosts": ("proxy.example", "*.corp.example", "*")},
        {"log_level": "DEBUG", "default_temperature": 0},
        {"model": Path("/m"), "chat_template": Path("t.jinja")},
        {"blas_threads": "auto"},
        {"blas_threads": "2"},
    ],
)
def test_good_values(values):
    config = ServerConfig(**values)
    for name, value in values.items():
        assert getattr(config, name) == value


def test_ctx_size_defaults_to_the_model_and_the_dead_field_is_gone():
    assert ServerConfig().ctx_size is None
    assert "extra" not in {f.name for f in fields(ServerConfig)}


def test_from_env_names_the_variable():
    assert ServerConfig.from_env({"TRIOSERVE_CTX_SIZE": "4096"}).ctx_size == 4096
    assert ServerConfig.from_env({"TRIOSERVE_CTX_SIZE": "none"}).ctx_size is None
    config = ServerConfig.from_env({"TRIOSERVE_ALLOWED_HOSTS": "a.example, b.example"})
    assert config.allowed_hosts == ("a.example", "b.example")
    assert (
        ServerConfig.from_env(
            {"TRIOSERVE_REQUIRE_JSON_CONTENT_TYPE": "0"}
        ).require_json_content_type
        is False
    )
    with pytest.raises(ConfigError, match=r"^TRIOSERVE_PARALLEL must be at least 1, got 0$"):
        ServerConfig.from_env({"TRIOSERVE_PARALLEL": "0"})
    with pytest.raises(ConfigError, match=r"^TRIOSERVE_PARALLEL must be an integer, got 'x'$"):
        ServerConfig.from_env({"TRIOSERVE_PARALLEL": "x"})
    with pytest.raises(ConfigError, match="TRIOSERVE_HEARTBEAT_INTERVAL_S must be a number"):
        ServerConfig.from_env({"TRIOSERVE_HEARTBEAT_INTERVAL_S": "fast"})
    with pytest.raises(ConfigError, match="TRIOSERVE_CTX_SIZE must be at least"):
        ServerConfig.from_env({"TRIOSERVE_CTX_SIZE": "8"})


def test_create_app_refuses_a_bad_environment_before_loading(monkeypatch):
    from trioserve.api.app import create_app

    monkeypatch.setenv("TRIOSERVE_SEND_TIMEOUT_S", "-1")
    monkeypatch.setenv("TRIOSERVE_MODEL", "/nonexistent/model")  # never reached
    with pytest.raises(ConfigError, match="TRIOSERVE_SEND_TIMEOUT_S"):
        create_app()


def config_of(*argv: str) -> ServerConfig:
    return _serve_config(build_parser().parse_args(["serve", *argv]))


def test_cli_flags_reach_the_config():
    config = config_of(
        "--ctx-size",
        "2048",
        "--allowed-hosts",
        "proxy.example",
        "*.corp.example",
        "--any-content-type",
        "--queue-timeout",
        "0",
        "--send-timeout",
        "0",
        "--solo-prefill-step-size",
        "0",
    )
    assert config.ctx_size == 2048
    assert config.allowed_hosts == ("proxy.example", "*.corp.example")
    assert config.require_json_content_type is False
    assert config.queue_timeout_s is None  # 0 on the command line: no limit
    assert config.send_timeout_s == 0 and config.solo_prefill_step_size == 0
    defaults = config_of()
    assert defaults.ctx_size is None and defaults.allowed_hosts == ()
    assert defaults.require_json_content_type is True and defaults.queue_timeout_s == 300.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parallel", "0"], "--parallel must be at least 1, got 0"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval must be a number of seconds"),
        (["--send-timeout", "-1"], "--send-timeout must be a number of seconds, 0 or more"),
        (["--queue-timeout", "-5"], "--queue-timeout must be a number of seconds above 0"),
        (["--shutdown-grace", "-1"], "--shutdown-grace"),
        (["--max-queue", "-1"], "--max-queue must be at least 0"),
        (["--prefill-step-size", "0"], "--prefill-step-size must be at least 1"),
        (["--solo-prefill-step-size", "-1"], "--solo-prefill-step-size must be at least 0"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--ctx-size", "4"], "--ctx-size must be at least 16"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--allowed-hosts", "http://x/"], "--allowed-hosts takes host names"),
        (["--blas-threads", "many"], "--blas-threads must be auto or a count from 1 to 256"),
    ],
)
def test_cli_prints_one_line_and_exits_2(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("trioserve serve: error: ")
    assert err.count("\n") == 1 and message in err, err


def test_real_command_exits_2_with_one_line():
    # The real entry point, as a user runs it: no traceback, one line, status 2, and fast
    # (the check comes before the model is resolved or loaded).
    result = subprocess.run(
        [sys.executable, "-m", "trioserve", "serve", "--parallel", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == "trioserve serve: error: --parallel must be at least 1, got 0\n"
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_documents_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ctx-size TOKENS bound on prompt plus generated tokens for every request" in text
    assert "--allowed-hosts HOST [HOST ...]" in text and "DNS rebinding" in text
    assert "--any-content-type" in text and "415" in text
