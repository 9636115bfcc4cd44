"""Tiny GGUFs of each architecture, written by the tests as llama.cpp writes them, convert
to mlx-lm models whose logits match the reference model's.

Tolerance: the reference holds exactly the dequantized values of the written blocks, and
the float32 conversion writes the same numbers, so only the order of float32 operations
differs (llama's interleaved RoPE and permuted q.k sums, the fused kernels): rounding of a
few 1e-6 relative. We allow 1e-4 of the logit scale; any real mistake (an unpermuted head,
a missing norm shift, a wrong rope base, window or scaling) moves logits by O(0.1-1).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_gguf
from tiny_gguf import Q, make_case

from trioserve.models import ConversionError, convert_gguf, load_model

# Longer than gemma3's sliding window (4), spanning the byte tokens and merges.
TOKENS = [1, 72, 104, 111, 3, 40, 260, 270, 299, 150, 33, 2]
TOLERANCE = 1e-4


def base(name: str) -> str:
    """'blk.0.attn_q.weight' -> 'attn_q', 'token_embd.weight' -> 'token_embd'."""
    return name.split(".")[-2]


def layer(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def max_rel_diff(case, model) -> float:
    import mlx.core as mx

    ref = case.logits(TOKENS)
    got = np.array(model(mx.array([TOKENS])).astype(mx.float32))
    assert got.shape == ref.shape == (1, len(TOKENS), tiny_gguf.VOCAB)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def convert_and_load(case, out: Path, dtype: str = "float32"):
    out = convert_gguf(case.path, out, dtype=dtype)
    model, _ = load_model(out)
    return out, model, json.loads((out / "config.json").read_text())


def llama_types(name, shape):
    """A Q4_0 + Q8_0 + F16 mix."""
    if base(name) in ("attn_q", "attn_k", "ffn_gate", "ffn_up", "output"):
        return Q.Q4_0
    if base(name) in ("attn_v", "attn_output", "token_embd"):
        return Q.Q8_0
    return Q.F16


def qwen2_q4_k_m(name, shape):
    """llama.cpp's Q4_K_M: Q4_K, with Q6_K for the (tied) embeddings and for attn_v and
    ffn_down of the layers `use_more_bits` picks (of 2 layers: layer 0)."""
    if base(name) == "token_embd":
        return Q.Q6_K
    if base(name) in ("attn_v", "ffn_down") and layer(name) == 0:
        return Q.Q6_K
    return Q.Q4_K


def test_llama_mix_matches_reference_and_the_permutation_matters(tmp_path):
    case = make_case("llama", tmp_path / "llama.gguf", llama_types)
    types = {t.name for t, _ in case.written.values()}
    assert types == {"Q4_0", "Q8_0", "F16", "F32"}
    out, model, config = convert_and_load(case, tmp_path / "out")
    assert max_rel_diff(case, model) < TOLERANCE
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is False
    # llama3 rope scaling: only the rope_freqs factors are stored; recovered exactly.
    assert config["rope_scaling"] == tiny_gguf.LLAMA3_SCALING

    # The control: the same weights with HF's rotate-half RoPE are far off, so the test
    # does see llama.cpp's Q/K permutation (and rope_traditional undoes it).
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    (wrong / "config.json").write_text(json.dumps(config | {"rope_traditional": False}))
    assert max_rel_diff(case, load_model(wrong)[0]) > 100 * TOLERANCE


def test_llama_quantized_keeps_mlx_triplets_and_matches(tmp_path):
    import mlx.core as mx

    case = make_case("llama", tmp_path / "llama.gguf", llama_types)
    out, model, config = convert_and_load(case, tmp_path / "out", dtype="quantized")
    weights = mx.load(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert weights[f"{q}.weight"].dtype == mx.uint32 and f"{q}.scales" in weights
    assert weights["model.embed_tokens.weight"].dtype == mx.uint32  # Q8_0
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32  # F16 in GGUF
    quant = config["quantization"]
    assert quant[q] == {"group_size": 32, "bits": 4}
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quant["model.layers.0.mlp.down_proj"] is False
    # The triplets hold the ggml values exactly (float32 scales on the CPU): same numbers.
    assert max_rel_diff(case, model) < TOLERANCE


def test_qwen2_q4_k_m_matches_reference(tmp_path):
    """The headline: a Q4_K_M GGUF of a qwen2 model converts to the reference's logits."""
    case = make_case("qwen2", tmp_path / "qwen2.gguf", qwen2_q4_k_m)
    assert case.written["blk.0.attn_q.bias"][0] == Q.F32
    assert {t.name for t, _ in case.written.values()} == {"Q4_K", "Q6_K", "F32"}
    _, model, config = convert_and_load(case, tmp_path / "out")
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert "rope_traditional" not in config  # NEOX rope, weights not permuted
    assert max_rel_diff(case, model) < TOLERANCE


def test_qwen3_q5_k_q5_0_matches_reference(tmp_path):
    def types(name, shape):
        return Q.Q5_K if base(name).startswith("attn") or base(name) == "output" else Q.Q5_0

    case = make_case("qwen3", tmp_path / "qwen3.gguf", types)
    assert "blk.1.attn_k_norm.weight" in case.written
    _, model, config = convert_and_load(case, tmp_path / "out")
    assert config["head_dim"] == tiny_gguf.HEAD_DIM and config["tie_word_embeddings"] is False
    assert max_rel_diff(case, model) < TOLERANCE


def test_gemma3_q6_k_q8_0_matches_reference(tmp_path):
    def types(name, shape):
        return Q.Q6_K if base(name).startswith("attn") else Q.Q8_0

    case = make_case("gemma3", tmp_path / "gemma3.gguf", types)
    _, model, config = convert_and_load(case, tmp_path / "out")
    ref = tiny_gguf.REFERENCE_CONFIGS["gemma3"]
    for key in ("sliding_window", "sliding_window_pattern", "rope_theta", "head_dim"):
        assert config[key] == ref[key], key
    assert config["rope_local_base_freq"] == 10_000.0
    assert config["query_pre_attn_scalar"] == tiny_gguf.HEAD_DIM
    assert max_rel_diff(case, model) < TOLERANCE


def test_phi3_q4_1_q3_k_with_longrope_matches_reference(tmp_path):
    def types(name, shape):
        return Q.Q4_1 if base(name) in ("attn_qkv", "ffn_down", "token_embd") else Q.Q3_K

    case = make_case("phi3", tmp_path / "phi3.gguf", types)
    _, model, config = convert_and_load(case, tmp_path / "out")
    ref = tiny_gguf.REFERENCE_CONFIGS["phi3"]
    assert config["partial_rotary_factor"] == 0.5
    assert config["rope_scaling"]["type"] == "longrope"
    assert config["rope_scaling"]["long_factor"] == ref["rope_scaling"]["long_factor"]
    assert config["original_max_position_embeddings"] == 1024
    assert max_rel_diff(case, model) < TOLERANCE


def test_shape_mismatch_is_one_line(tmp_path):
    case = make_case(
        "qwen2", tmp_path / "bad.gguf", qwen2_q4_k_m, overrides={"qwen2.feed_forward_length": 1024}
    )
    with pytest.raises(ConversionError) as info:
        convert_gguf(case.path, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and str(case.path) in message
    assert "mlp.gate_proj.weight has shape (512, 256), expected (1024, 256)" in message
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_and_architecture_name_what_is_supported(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "extra.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.embedding_length", 256)
    w.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float32))
    w.add_tensor("blk.0.mystery.weight", np.zeros((4, 256), dtype=np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        step()
    w.close()
    with pytest.raises(ConversionError) as info:
        convert_gguf(path, tmp_path / "out")
    message = str(info.value)
    assert "unsupported tensor blk.0.mystery.weight for a llama model" in message
    assert "blk.N.attn_q" in message and "\n" not in message

    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        step()
    w.close()
    with pytest.raises(ConversionError) as info:
        convert_gguf(path, tmp_path / "out")
    assert "unsupported architecture 'mamba' (supported: llama, qwen2, qwen3, gemma3, phi3)" in str(
        info.value
    )
