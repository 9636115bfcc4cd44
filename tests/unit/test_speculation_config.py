"""``--speculation``, ``--speculation-draft-tokens`` and ``--draft-model``: from the command
line (or the environment) to the engine's speculation settings."""

from __future__ import annotations

import pytest

from trioserve.api.app import engine_config
from trioserve.cli import _serve_config, build_parser
from trioserve.config import ConfigError, ServerConfig
from trioserve.engine.draft_model import DraftModelMismatch, check_same_tokenizer


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


def test_a_draft_model_reaches_the_engine(model_dir):
    config = _config("--speculation", "draft-model", "--draft-model", str(model_dir))
    assert config.draft_model == str(model_dir)
    engine = engine_config(config, model_dir, context_length=8192)
    assert engine.speculation.mode == "draft-model"
    assert engine.speculation.load_draft is not None
    assert engine_config(_config(), model_dir, 8192).speculation.load_draft is None


class _Tokenizer:
    def __init__(self, vocab: dict[str, int], eos: set[int]) -> None:
        self._vocab, self.eos_token_ids = vocab, eos

    def get_vocab(self) -> dict[str, int]:
        return self._vocab


def test_a_draft_model_with_another_tokenizer_is_refused():
    ours = _Tokenizer({"a": 0, "b": 1, "</s>": 2}, {2})
    check_same_tokenizer(ours, _Tokenizer({"a": 0, "b": 1, "</s>": 2}, {2}))
    with pytest.raises(DraftModelMismatch, match="tokenizer is not the model's"):
        check_same_tokenizer(ours, _Tokenizer({"a": 0, "c": 1, "</s>": 2}, {2}))
    with pytest.raises(DraftModelMismatch, match="end-of-sequence"):
        check_same_tokenizer(ours, _Tokenizer({"a": 0, "b": 1, "</s>": 2}, {1}))


def test_a_missing_draft_model_is_a_one_line_error(capsys, model_dir, tmp_path):
    from trioserve.cli import main

    missing = tmp_path / "no-such-draft"
    assert main(["serve", "--model", str(model_dir), "--draft-model", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"error: {missing}: no such model directory" in err
    assert "Traceback" not in err
