"""GGUF -> mlx-lm conversion: a working model, and clean one-line failures."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from trioserve.models import ConversionError, OutputExistsError, convert_gguf, load_model
from trioserve.models.gguf import COMPLETE_MARKER, run_convert_cli
from trioserve.models.gguf import convert as gguf_module


def assert_clean(parent: Path, out_dir: Path) -> None:
    """Neither the output nor a temporary directory was left behind."""
    assert not out_dir.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


def assert_one_line(exc: ConversionError, path: Path) -> str:
    message = str(exc)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_default_model_answers_paris(loaded_model, model_dir, ask):
    model, tokenizer = loaded_model
    answer = ask(model, tokenizer, "What is the capital of France?")
    print(f"answer: {answer!r}")
    assert "Paris" in answer, answer
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (model_dir / COMPLETE_MARKER).is_file()


def test_float16_conversion(gguf_path, tmp_path, ask):
    import mlx.core as mx

    out = convert_gguf(gguf_path, tmp_path / "f16", dtype="float16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    model, tokenizer = load_model(out)
    assert "Paris" in ask(model, tokenizer, "What is the capital of France?")


def test_missing_file(tmp_path):
    missing, out = tmp_path / "nope.gguf", tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_gguf(missing, out)
    assert "no such file" in assert_one_line(info.value, missing)
    assert_clean(tmp_path, out)


def test_random_bytes(tmp_path):
    bad, out = tmp_path / "random.gguf", tmp_path / "out"
    bad.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ConversionError) as info:
        convert_gguf(bad, out)
    assert "not a GGUF file" in assert_one_line(info.value, bad)
    assert_clean(tmp_path, out)


def test_gguf_magic_then_garbage(tmp_path):
    # MLX's own reader segfaults on this one: the header scan must catch it first.
    bad, out = tmp_path / "garbage.gguf", tmp_path / "out"
    bad.write_bytes(b"GGUF" + bytes([0xA5, 0x17, 0x3C, 0x99]) * 2000)
    with pytest.raises(ConversionError) as info:
        convert_gguf(bad, out)
    assert "corrupt" in assert_one_line(info.value, bad)
    assert_clean(tmp_path, out)


@pytest.mark.parametrize("size", [1_000_000, 50_000_000])
def test_truncated_copy(gguf_path, tmp_path, size):
    bad, out = tmp_path / "truncated.gguf", tmp_path / "out"
    with open(gguf_path, "rb") as src:
        bad.write_bytes(src.read(size))
    with pytest.raises(ConversionError) as info:
        convert_gguf(bad, out)
    assert "truncated" in assert_one_line(info.value, bad)
    assert_clean(tmp_path, out)


def test_unsupported_architecture(tmp_path):
    import mlx.core as mx

    bad, out = tmp_path / "gpt2.gguf", tmp_path / "out"
    mx.save_gguf(str(bad), {"x": mx.zeros((2, 2))}, {"general.architecture": "gpt2"})
    with pytest.raises(ConversionError) as info:
        convert_gguf(bad, out)
    assert "unsupported architecture 'gpt2'" in assert_one_line(info.value, bad)
    assert_clean(tmp_path, out)


def test_unsupported_tensor_type(tmp_path):
    import mlx.core as mx

    bad, out = tmp_path / "ints.gguf", tmp_path / "out"
    weights = {"token_embd.weight": mx.zeros((4, 4), dtype=mx.int32)}
    mx.save_gguf(str(bad), weights, {"general.architecture": "llama"})
    with pytest.raises(ConversionError) as info:
        convert_gguf(bad, out)
    assert "unsupported tensor type I32" in assert_one_line(info.value, bad)
    assert_clean(tmp_path, out)


def test_full_disk(gguf_path, tmp_path, monkeypatch):
    def fill_then_fail(file, *args, **kwargs):
        file.write(b"\0" * 1_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_module, "write_safetensors", fill_then_fail)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_gguf(gguf_path, out)
    message = assert_one_line(info.value, gguf_path)
    assert f"no space left on device writing {out}" in message
    assert_clean(tmp_path, out)


def test_permission_denied(gguf_path, tmp_path, monkeypatch):
    def deny(out_dir):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(gguf_module, "_make_temp_dir", deny)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_gguf(gguf_path, out)
    assert f"permission denied writing {out}" in assert_one_line(info.value, gguf_path)
    assert_clean(tmp_path, out)


def test_nonempty_output_is_refused(gguf_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        convert_gguf(gguf_path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_appearing_meanwhile_is_kept(gguf_path, model_dir, tmp_path, monkeypatch):
    """A concurrent converter that renames first wins; our copy is discarded."""
    out = tmp_path / "out"
    real_fsync = gguf_module._fsync_tree

    def other_process_wins(directory):
        real_fsync(directory)
        shutil.copytree(model_dir, out)

    monkeypatch.setattr(gguf_module, "_fsync_tree", other_process_wins)
    with pytest.raises(OutputExistsError):
        convert_gguf(gguf_path, out)
    assert (out / COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_reports_one_error_line(tmp_path, capsys):
    code = run_convert_cli(str(tmp_path / "nope.gguf"), str(tmp_path / "out"), "float32")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot convert ")
    assert "nope.gguf" in err[-1]
