"""Tiny GGUF files written the way llama.cpp's converter writes them, with a reference model.

`make_case(arch, types)` builds a random 2-layer mlx-lm model (the reference, HF weight
names), maps its weights into GGUF space as convert_hf_to_gguf.py does (names, llama's Q/K
permutation, gemma3's norm + 1, biases, fused phi3 projections as mlx-lm already has them),
quantizes each tensor to the ggml type `types(gguf_name)` picks, and then sets the
reference's weights to the dequantization of exactly the blocks written (mapped back to HF
space). A correct converter must therefore reproduce the reference's logits.

gguf-py can quantize only F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (and a few more);
for K-quants and IQ types we write blocks of random bytes whose float16 scale fields are
set to small sane values (random scale bits could be NaN/inf), and let gguf-py dequantize.

Dims: hidden 256 and every projection's input a multiple of 256, so that every quant type
(K-quant and IQ blocks hold 256 values) applies to every matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

Q = GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 256, 512, 4, 2, 64, 2
# Types gguf-py can quantize itself; the others get random blocks.
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F64}
# Byte offsets of the float16 scale fields in one block, per type (ggml-common.h).
_F16_FIELDS = {
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ2_XXS: (0,),
    Q.IQ2_XS: (0,),
    Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,),
    Q.IQ3_S: (0,),
    Q.IQ1_S: (0,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
    Q.TQ1_0: (52,),
    Q.TQ2_0: (64,),
}


def byte_level_vocab(n_merges: int = 41) -> dict[str, Any]:
    """GGUF tokenizer metadata for a small byte-level BPE ("gpt2") vocabulary."""
    # GPT-2's bytes_to_unicode: every byte as a printable character.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    byte_tokens = [chars[b] for b in range(256)]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pairs = [(a, b) for a in letters for b in letters][:n_merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_tokens + [a + b for a, b in pairs]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in pairs],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


VOCAB = len(byte_level_vocab()["tokenizer.ggml.tokens"])  # 300


def random_blocks(
    qtype: GGMLQuantizationType, rows: int, cols: int, rng, target_std: float
) -> np.ndarray:
    """Random ggml blocks (rows, bytes per row) for types gguf-py cannot quantize, with
    their float16 scale fields set so that the values have about `target_std` (random
    scale bits could be NaN/inf, or give values in the thousands)."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    jitter = rng.uniform(0.5, 1.5, size=blocks.shape[:2])

    def set_scales(scale: float) -> np.ndarray:
        d = (jitter * scale).astype(np.float16)
        for offset in _F16_FIELDS.get(qtype, ()):
            blocks[..., offset : offset + 2] = d.view(np.uint8).reshape(*d.shape, 2)
        if qtype == Q.IQ1_M:  # the f16 scale is spread over the top nibbles of 4 uint16s
            bits = d.view(np.uint16)
            sc = blocks[..., 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
            for i, shift in enumerate((0, 4, 8, 12)):  # d bits 0-3 in scale 0, ...
                sc[..., i] |= ((bits >> shift) & np.uint16(0xF)) << np.uint16(12)
            blocks[..., 48:56] = sc.view(np.uint8)
        return gguf_quants.dequantize(blocks.reshape(rows, -1), qtype)

    if qtype == Q.MXFP4:  # e8m0 exponent byte: 2**(e - 127)
        blocks[..., 0] = rng.integers(118, 122, size=blocks.shape[:2], dtype=np.uint8)
    elif qtype != Q.NVFP4:  # (NVFP4's e4m3 scales are bounded)
        std = set_scales(0.01).std()
        set_scales(0.01 * target_std / std)
    return blocks.reshape(rows, -1)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, rng) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, its dequantization as float32) for a row-major float32 tensor."""
    if qtype == Q.F64:
        return x.astype(np.float64), x.astype(np.float64).astype(np.float32)
    if qtype in QUANTIZABLE:
        data = gguf_quants.quantize(x, qtype)
    else:
        data = random_blocks(qtype, x.shape[0], x.shape[1], rng, float(x.std()))
    values = gguf_quants.dequantize(data, qtype).astype(np.float32).reshape(x.shape)
    assert np.isfinite(values).all(), qtype
    return data, values


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half Q/K rows -> interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GEMMA_LAYER = _LAYER | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(arch: str, hf_name: str) -> str:
    """The test's own HF -> GGUF name mapping (as in gguf-py's tensor_mapping.py)."""
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        table = _GEMMA_LAYER if arch == "gemma3" else _LAYER
        return f"blk.{layer}.{table[rest]}.{suffix}"
    return f"{_GLOBAL[base]}.{suffix}"


def _base_config(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        **extra,
    }


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# mlx-lm configs of the reference models (HF layout: rope not interleaved).
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _base_config(
        model_type="llama",
        head_dim=HEAD_DIM,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=LLAMA3_SCALING,
    ),
    "qwen2": _base_config(model_type="qwen2", rope_theta=1_000_000.0, tie_word_embeddings=True),
    "qwen3": _base_config(
        model_type="qwen3", head_dim=HEAD_DIM, rope_theta=1_000_000.0, tie_word_embeddings=False
    ),
    # Two layers: pattern 2 (layer 0 sliding, layer 1 global; real models use 6) and a
    # window of 4, shorter than the test sequence, so that both masks and rope bases matter.
    "gemma3": _base_config(
        model_type="gemma3_text",
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=4,
        sliding_window_pattern=2,
    ),
    # Partial rotary (half of each head) with LongRoPE factors.
    "phi3": _base_config(
        model_type="phi3",
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_scaling={
            "type": "longrope",
            "long_factor": [1.0 + 0.25 * i for i in range(16)],
            "short_factor": [1.0 + 0.05 * i for i in range(16)],
        },
    ),
}


def build_reference(config: dict[str, Any], seed: int):
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def _metadata(arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp's converter writes for `config`."""
    a = arch
    md: dict[str, Any] = {
        f"{a}.context_length": config["max_position_embeddings"],
        f"{a}.embedding_length": HIDDEN,
        f"{a}.block_count": LAYERS,
        f"{a}.feed_forward_length": FFN,
        f"{a}.attention.head_count": HEADS,
        f"{a}.attention.head_count_kv": config["num_key_value_heads"],
        f"{a}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{a}.rope.freq_base": config["rope_theta"],
    }
    if arch == "llama":
        md |= {f"{a}.rope.dimension_count": HEAD_DIM, f"{a}.vocab_size": VOCAB}
    if arch in ("qwen3", "gemma3"):
        md |= {f"{a}.attention.key_length": HEAD_DIM, f"{a}.attention.value_length": HEAD_DIM}
    if arch == "gemma3":
        md |= {
            f"{a}.attention.sliding_window": config["sliding_window"],
            f"{a}.attention.sliding_window_pattern": config["sliding_window_pattern"],
        }
    if arch == "phi3":
        rope_dims = int(config["partial_rotary_factor"] * HIDDEN) // HEADS
        md |= {
            f"{a}.rope.dimension_count": rope_dims,
            f"{a}.rope.scaling.original_context_length": config["original_max_position_embeddings"],
            f"{a}.attention.sliding_window": 0,
        }
    return md


def _add(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


@dataclass
class Case:
    """A written tiny GGUF and the reference model holding exactly its weights."""

    arch: str
    path: Path
    model: Any
    config: dict[str, Any]
    written: dict[str, tuple[GGMLQuantizationType, np.ndarray]] = field(default_factory=dict)

    def logits(self, tokens: list[int]) -> np.ndarray:
        import mlx.core as mx

        return np.array(self.model(mx.array([tokens])).astype(mx.float32))


def make_case(
    arch: str,
    path: Path,
    types: Callable[[str, tuple[int, ...]], GGMLQuantizationType],
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Case:
    """Write `path` (a GGUF of architecture `arch`) and return it with its reference."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = REFERENCE_CONFIGS[arch]
    model = build_reference(config, seed)
    rng = np.random.default_rng(seed)
    hf = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    if arch == "gemma3":
        hf.pop("lm_head.weight")  # tied: the reference uses the embeddings
        model.sanitize(hf)
    for name in hf:  # non-trivial norms (a missing gemma shift or swapped norm shows)
        if name.endswith("norm.weight"):
            base = 0.0 if arch == "gemma3" else 1.0  # gemma3 scales by 1 + w
            hf[name] = (base + 0.2 * rng.standard_normal(hf[name].shape)).astype(np.float32)
        elif name.endswith(".bias"):
            hf[name] = (0.1 * rng.standard_normal(hf[name].shape)).astype(np.float32)
        elif name == "model.embed_tokens.weight":
            hf[name] = (0.5 * rng.standard_normal(hf[name].shape)).astype(np.float32)

    writer = GGUFWriter(str(path), arch)
    metadata = {**_metadata(arch, config), **byte_level_vocab(), **(overrides or {})}
    for key, value in metadata.items():
        _add(writer, key, value)
    case = Case(arch, path, model, config)
    reference: dict[str, np.ndarray] = {}
    for name, x in hf.items():
        g = gguf_name(arch, name)
        heads = HEADS if "q_proj" in name else KV_HEADS
        permuted = arch == "llama" and ("q_proj" in name or "k_proj" in name)
        if permuted:
            x = permute(x, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            x = x + 1.0  # llama.cpp's Gemma3Model: norm_shift
        qtype = Q.F32 if x.ndim == 1 else types(g, x.shape)
        data, values = quantize(x, qtype, rng)
        writer.add_tensor(g, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        case.written[g] = (qtype, values)
        if permuted:
            values = unpermute(values, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values - 1.0
        reference[name] = values
    for g, values in _config_tensors(arch, config).items():
        writer.add_tensor(g, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_weights([(k, mx.array(v)) for k, v in reference.items()], strict=True)
    mx.eval(model.parameters())
    return case


def _config_tensors(arch: str, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors that llama.cpp writes for rope scaling: llama3's rope_freqs, phi3's factors."""
    if arch == "llama":
        from trioserve.models.gguf.architectures import llama3_factors

        # Cross-checked below against llama.cpp's formula, written out independently.
        factors = llama3_factors(HEAD_DIM, config["rope_theta"], config["rope_scaling"])
        s = config["rope_scaling"]
        expected = []
        for i in range(0, HEAD_DIM, 2):
            wavelen = 2 * math.pi / (1.0 / config["rope_theta"] ** (i / HEAD_DIM))
            old = s["original_max_position_embeddings"]
            if wavelen < old / s["high_freq_factor"]:
                expected.append(1.0)
            elif wavelen > old / s["low_freq_factor"]:
                expected.append(s["factor"])
            else:
                smooth = (old / wavelen - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"]
                )
                expected.append(1 / ((1 - smooth) / s["factor"] + smooth))
        assert np.allclose(factors, expected, rtol=1e-6)
        assert factors.min() == 1.0 and factors.max() == s["factor"]  # all three regimes
        return {"rope_freqs.weight": np.array(expected, dtype=np.float32)}
    if arch == "phi3":
        s = config["rope_scaling"]
        return {
            "rope_factors_long.weight": np.array(s["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.array(s["short_factor"], dtype=np.float32),
        }
    return {}
