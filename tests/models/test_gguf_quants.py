"""Every quant type gguf-py reads converts to what gguf-py says; cross-checks against MLX's
own GGUF reader where it is right, and the Q4_K case where it is not; the "quantized"
dtype on the embedded SmolLM2 model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_gguf
from gguf import quants as gguf_quants
from tiny_gguf import Q, make_case

from trioserve.models import convert_gguf, load_model
from trioserve.models.gguf import SUPPORTED_TENSOR_TYPES, default_dtype

# qwen2 (no llama permutation, no gemma shift): the converted tensor is the GGUF tensor.
MATRICES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
    "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
}


def converted_weights(case, out) -> dict[str, np.ndarray]:
    import mlx.core as mx

    convert_gguf(case.path, out, dtype="float32")
    return {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}


@pytest.mark.parametrize("type_name", SUPPORTED_TENSOR_TYPES)
def test_every_type_converts_to_ggufs_dequantization(type_name, tmp_path):
    """Our path end to end (reader, chunked dequantization, safetensors) against
    gguf.quants.dequantize of the very blocks written: bit for bit."""
    case = make_case("qwen2", tmp_path / "m.gguf", lambda name, shape: Q[type_name])
    weights = converted_weights(case, tmp_path / "out")
    for gguf_name, mlx_name in MATRICES.items():
        qtype, values = case.written[gguf_name]
        assert qtype.name == type_name
        assert weights[mlx_name].dtype == np.float32
        np.testing.assert_array_equal(weights[mlx_name], values, err_msg=mlx_name)


def _mlx_reads(path, name: str) -> np.ndarray:
    """MLX's own reading of a GGUF tensor: float16, or a dequantized affine triplet."""
    import mlx.core as mx

    raw = mx.load(str(path))
    base = name.removesuffix(".weight")
    if f"{base}.scales" not in raw:
        return np.array(raw[name].astype(mx.float32))
    w, s, b = raw[name], raw[f"{base}.scales"], raw[f"{base}.biases"]
    bits = w.shape[-1] // s.shape[-1]  # uint32 words per group of 32 values
    return np.array(
        mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
    )


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "Q6_K"])
def test_types_mlx_reads_right_agree_with_mlx(type_name, tmp_path):
    """An independent implementation (MLX's C++ GGUF reader) agrees, within its float16."""
    case = make_case("qwen2", tmp_path / "m.gguf", lambda name, shape: Q[type_name])
    weights = converted_weights(case, tmp_path / "out")
    for gguf_name, mlx_name in MATRICES.items():
        theirs = _mlx_reads(case.path, gguf_name)
        scale = np.abs(theirs).max()
        assert np.abs(weights[mlx_name] - theirs).max() <= 1e-3 * scale, mlx_name


def test_q4_k_converts_right_where_mlx_reads_it_wrong(tmp_path):
    """MLX 0.32.4's GGUF reader applies the first half's scale to the second half of each
    64-value Q4_K group: its values differ from llama.cpp's, ours do not."""
    case = make_case("qwen2", tmp_path / "m.gguf", lambda name, shape: Q.Q4_K)
    weights = converted_weights(case, tmp_path / "out")
    name = "blk.1.ffn_down.weight"
    _, values = case.written[name]
    ours, theirs = weights[MATRICES[name]], _mlx_reads(case.path, name)
    np.testing.assert_array_equal(ours, values)
    groups = np.abs(theirs - values).reshape(-1, 64)
    assert groups.max() > 0.1 * np.abs(values).max()  # MLX is badly off ...
    assert groups[:, :32].max() <= 1e-3 * np.abs(values).max()  # ... in the second halves


def test_default_dtype_is_float32_on_the_cpu():
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        assert default_dtype() == "float32"
    else:
        assert default_dtype() == "quantized"


@pytest.fixture(scope="session")
def quantized_smollm(gguf_path, tmp_path_factory):
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("q") / "smollm2-q", dtype="quantized")


def test_quantized_smollm2_answers_paris(quantized_smollm, ask):
    import mlx.core as mx

    weights = mx.load(str(quantized_smollm / "model.safetensors"))
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        assert weights[f"model.layers.7.{proj}.weight"].dtype == mx.uint32  # Q4_1, 4-bit
        assert weights[f"model.layers.7.{proj}.weight"].shape[-1] * 8 == (
            weights[f"model.layers.7.{proj}.scales"].shape[-1] * 32
        )
    assert weights["model.embed_tokens.weight"].dtype == mx.uint32  # Q8_0, 8-bit
    config = json.loads((quantized_smollm / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    model, tokenizer = load_model(quantized_smollm)
    answer = ask(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer


def test_tiny_gguf_dims_let_every_type_apply():
    assert tiny_gguf.HIDDEN % 256 == 0 and tiny_gguf.FFN % 256 == 0
    assert gguf_quants.quant_shape_to_byte_shape((4, tiny_gguf.HIDDEN), Q.IQ1_M)
