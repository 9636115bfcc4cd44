"""``--speculation`` and ``--speculation-draft-tokens``: from the command line (or the
environment) to the engine's speculation settings."""

from __future__ import annotations

import pytest

from trioserve.api.app import engine_config
from trioserve.cli import _serve_config, build_parser
from trioserve.config import ConfigError, ServerConfig


def _config(*argv: str) -> ServerConfig:
    return _serve_config(build_parser().parse_args(["serve", *argv]))


def test_speculation_is_off_by_default():
    assert _config().speculation == "off"
    assert ServerConfig().speculation == "off"


def test_flags_reach_the_engine(tmp_path):
    config = _config("--speculation", "prompt-lookup", "--speculation-draft-tokens", "6")
    engine = engine_config(config, tmp_path, context_length=8192)
    assert engine.speculation.mode == "prompt-lookup"
    assert engine.speculation.num_draft == 6


@pytest.mark.parametrize(
    ("values", "needle"),
    [({"speculation": "draft-model"}, "speculation"), ({"speculation_draft_tokens": 0}, "draft")],
)
def test_bad_values_are_config_errors(values, needle):
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**values)


def test_an_unknown_mode_is_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculation", "sometimes"])
