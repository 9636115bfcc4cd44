"""Per architecture: GGUF metadata -> mlx-lm config.json, GGUF tensor names -> mlx-lm names.

Each entry mirrors how llama.cpp's convert_hf_to_gguf.py wrote that architecture:
- llama: Q/K rows permuted for interleaved RoPE. Instead of un-permuting we tell mlx-lm to
  rotate interleaved pairs (`rope_traditional`): the permutation maps HF's rotated pair
  (i, i + d/2) of each head to (2i, 2i+1), so both give the same q.k products, and the
  Q/K weights can stay quantized. llama3 rope scaling arrives as a `rope_freqs` tensor.
- qwen2: q/k/v biases, NEOX RoPE, no permutation. qwen3: q/k RMSNorms, explicit head_dim.
- gemma3: every `*norm.weight` was written as 1 + w (Gemma's RMSNorm scales by 1 + w, and
  llama.cpp's by w); mlx-lm's gemma3_text also scales by 1 + w, so we subtract 1 again.
- phi3: fused qkv and gate_up projections (as mlx-lm has them); LongRoPE factors arrive as
  `rope_factors_long/short` tensors and go into config.json.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trioserve.models.errors import ConversionError
from trioserve.models.gguf.dequantize import Source, dequantize_tensor
from trioserve.models.gguf.reader import GGUFFile
from trioserve.models.tokenizer import special_token_ids

_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LLAMA_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_LAYER_NAMES = {
    **{k: v for k, v in _LLAMA_LAYER_NAMES.items() if "norm" not in k},
    **_QK_NORMS,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_LAYER_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",  # gate and up fused, gate first, as in HF and mlx-lm
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class OutTensor:
    """One mlx-lm weight to write: its name, data, and a value to subtract (gemma norms)."""

    name: str
    source: Source
    subtract: float = 0.0


@dataclass
class Plan:
    """What to write: config.json and the weights, in the order they are produced."""

    config: dict[str, Any]
    tensors: list[OutTensor] = field(default_factory=list)


class _Meta:
    """`{arch}.*` metadata with one-line errors for missing keys."""

    def __init__(self, gf: GGUFFile, arch: str) -> None:
        self.md, self.arch, self.path = gf.metadata, arch, gf.path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.md.get(f"{self.arch}.{key}")
        return default if value is None else value

    def need(self, key: str) -> Any:
        value = self.md.get(f"{self.arch}.{key}")
        if value is None:
            raise ConversionError(self.path, f"metadata {self.arch}.{key} is missing")
        return value


def _rows(gf: GGUFFile, name: str) -> int:
    return int(gf.tensors[name].shape[-1])  # ggml order: the last dim is the row count


def _common_config(gf: GGUFFile, m: _Meta, hf_arch: str, model_type: str) -> dict[str, Any]:
    hidden, heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    if "token_embd.weight" not in gf.tensors:
        raise ConversionError(gf.path, "no token_embd tensor")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(m.need("block_count")),
        "intermediate_size": int(m.need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(m.need("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(m.get("vocab_size", _rows(gf, "token_embd.weight"))),
        "max_position_embeddings": int(m.get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        **special_token_ids(gf.metadata),
    }
    config.pop("unk_token_id", None)
    return config


def _head_dim(m: _Meta, config: dict[str, Any]) -> int:
    default = config["hidden_size"] // config["num_attention_heads"]
    head_dim = int(m.get("attention.key_length", default))
    if int(m.get("attention.value_length", head_dim)) != head_dim:
        raise ConversionError(m.path, "different key and value head sizes are not supported")
    return head_dim


def _full_rotary(m: _Meta, head_dim: int) -> None:
    rope_dims = m.get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConversionError(
            m.path, f"partial rotary embeddings ({rope_dims} of {head_dim}) are not supported"
        )


def _rope_scaling(m: _Meta, allowed: tuple[str, ...] = ("linear", "yarn")) -> dict | None:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in allowed:
        raise ConversionError(
            m.path, f"unsupported rope scaling {kind!r} (supported: {', '.join(allowed)})"
        )
    factor = float(m.need("rope.scaling.factor"))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    if m.get("rope.scaling.original_context_length") is not None:
        scaling["original_max_position_embeddings"] = int(
            m.get("rope.scaling.original_context_length")
        )
    return scaling


def llama3_factors(head_dim: int, base: float, scaling: dict[str, float]) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for a llama3 rope scaling."""
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, out)
    return np.where(wavelen > old_ctx / low, factor, out).astype(np.float32)


def _llama3_scaling(gf: GGUFFile, m: _Meta, head_dim: int, base: float) -> dict | None:
    """Recover the llama3 rope scaling parameters from `rope_freqs` (only the factors are
    stored): try the values Llama 3.x models use and keep the one that reproduces them."""
    freqs = dequantize_tensor(gf.tensors["rope_freqs.weight"]).ravel()
    if freqs.shape != (head_dim // 2,):
        raise ConversionError(gf.path, f"rope_freqs has {freqs.size} values, not {head_dim // 2}")
    if np.allclose(freqs, 1.0):
        return None
    factor = float(freqs.max())
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_ctx,
            }
            if np.allclose(llama3_factors(head_dim, base, scaling), freqs, rtol=1e-4):
                return scaling
    raise ConversionError(gf.path, "rope_freqs does not match a llama3 rope scaling")


def _llama_config(gf: GGUFFile, m: _Meta) -> dict[str, Any]:
    config = _common_config(gf, m, "LlamaForCausalLM", "llama")
    head_dim = _head_dim(m, config)
    _full_rotary(m, head_dim)
    config["head_dim"] = head_dim
    config["rope_theta"] = float(m.get("rope.freq_base", 10000.0))
    config["rope_traditional"] = True  # see the module docstring
    config["attention_bias"] = "blk.0.attn_q.bias" in gf.tensors
    config["mlp_bias"] = "blk.0.ffn_up.bias" in gf.tensors
    scaling = _rope_scaling(m)
    if "rope_freqs.weight" in gf.tensors:
        scaling = _llama3_scaling(gf, m, head_dim, config["rope_theta"]) or scaling
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _qwen2_config(gf: GGUFFile, m: _Meta) -> dict[str, Any]:
    config = _common_config(gf, m, "Qwen2ForCausalLM", "qwen2")
    head_dim = _head_dim(m, config)
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise ConversionError(gf.path, "qwen2 with head_dim != hidden/heads is not supported")
    _full_rotary(m, head_dim)
    config["rope_theta"] = float(m.get("rope.freq_base", 1_000_000.0))
    if scaling := _rope_scaling(m):
        config["rope_scaling"] = scaling
    return config


def _qwen3_config(gf: GGUFFile, m: _Meta) -> dict[str, Any]:
    config = _common_config(gf, m, "Qwen3ForCausalLM", "qwen3")
    config["head_dim"] = head_dim = _head_dim(m, config)
    _full_rotary(m, head_dim)
    config["rope_theta"] = float(m.get("rope.freq_base", 1_000_000.0))
    if scaling := _rope_scaling(m):
        config["rope_scaling"] = scaling
    return config


def _gemma3_config(gf: GGUFFile, m: _Meta) -> dict[str, Any]:
    config = _common_config(gf, m, "Gemma3ForCausalLM", "gemma3_text")
    config["head_dim"] = head_dim = _head_dim(m, config)
    _full_rotary(m, head_dim)
    pattern = m.get("attention.sliding_window_pattern", 6)  # llama.cpp hard-codes 6
    if isinstance(pattern, list):  # newer files: one flag per layer, True = sliding
        period = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
        expected = [(i + 1) % period != 0 for i in range(len(pattern))]
        if pattern != expected:
            raise ConversionError(gf.path, "unsupported gemma3 sliding window layout")
        pattern = period
    # llama.cpp scales queries by head_dim**-0.5, except the 27B (62 layers): hidden/heads.
    scalar = head_dim
    if config["num_hidden_layers"] == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    config |= {
        "rope_theta": float(m.get("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(m.get("rope.freq_base_swa", 10_000.0)),
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(m.need("attention.sliding_window")),
        "sliding_window_pattern": int(pattern),
    }
    if scaling := _rope_scaling(m, allowed=("linear",)):
        config["rope_scaling"] = scaling
    del config["tie_word_embeddings"]  # mlx-lm's gemma3_text ties when lm_head is absent
    return config


def _phi3_config(gf: GGUFFile, m: _Meta) -> dict[str, Any]:
    config = _common_config(gf, m, "Phi3ForCausalLM", "phi3")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope_dims = int(m.get("rope.dimension_count", head_dim))
    context = config["max_position_embeddings"]
    config |= {
        "rope_theta": float(m.get("rope.freq_base", 10000.0)),
        "partial_rotary_factor": rope_dims / head_dim,
        "original_max_position_embeddings": int(
            m.get("rope.scaling.original_context_length", context)
        ),
    }
    long_f, short_f = (
        gf.tensors.get("rope_factors_long.weight"),
        gf.tensors.get("rope_factors_short.weight"),
    )
    if (long_f is None) != (short_f is None):
        raise ConversionError(gf.path, "only one of rope_factors_long/short is present")
    if long_f is not None:
        # LongRoPE: mlx-lm's SuScaledRoPE takes the per-frequency factors from config.json.
        config["rope_scaling"] = {
            "type": "longrope",
            "long_factor": dequantize_tensor(long_f).ravel().tolist(),
            "short_factor": dequantize_tensor(short_f).ravel().tolist(),
        }
    elif scaling := _rope_scaling(m, allowed=("linear",)):
        config["rope_scaling"] = scaling
    return config


@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` becomes an mlx-lm model."""

    name: str
    build_config: Callable[[GGUFFile, _Meta], dict[str, Any]]
    layer_names: dict[str, str]
    config_tensors: frozenset[str] = frozenset()  # read into config.json, not weights
    norm_shift: float = 0.0  # subtracted from every `*norm.weight`
    # name -> the GGUF parts fused along rows into it, when a file stores them apart
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "llama",
            _llama_config,
            _LLAMA_LAYER_NAMES,
            config_tensors=frozenset({"rope_freqs.weight"}),
        ),
        Architecture("qwen2", _qwen2_config, _LLAMA_LAYER_NAMES),
        Architecture("qwen3", _qwen3_config, _LLAMA_LAYER_NAMES | _QK_NORMS),
        Architecture("gemma3", _gemma3_config, _GEMMA3_LAYER_NAMES, norm_shift=1.0),
        Architecture(
            "phi3",
            _phi3_config,
            _PHI3_LAYER_NAMES,
            config_tensors=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"}),
            fused={"attn_qkv": ("attn_q", "attn_k", "attn_v")},
        ),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture_for(name: Any, path: Path) -> Architecture:
    """The Architecture of a `general.architecture` value, or a one-line ConversionError."""
    if name is None:
        raise ConversionError(path, "no general.architecture in the GGUF metadata")
    if name not in ARCHITECTURES:
        raise ConversionError(
            path,
            f"unsupported architecture {name!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    return ARCHITECTURES[name]


def _mlx_name(arch: Architecture, gguf_name: str) -> str | None:
    if m := _LAYER_RE.match(gguf_name):
        layer, base, suffix = m.groups()
        mapped = arch.layer_names.get(base)
        return f"model.layers.{int(layer)}.{mapped}.{suffix}" if mapped else None
    if m := _GLOBAL_RE.match(gguf_name):
        mapped = _GLOBAL_NAMES.get(m.group(1))
        return f"{mapped}.{m.group(2)}" if mapped else None
    return None


def plan_conversion(gf: GGUFFile, arch: Architecture) -> Plan:
    """The config.json and the list of weights for `gf`; ConversionError on unknown tensors."""
    plan = Plan({})
    names = [n for n in gf.tensors if n not in arch.config_tensors]
    taken: set[str] = set()
    for target, parts in arch.fused.items():  # e.g. phi3 attn_q/k/v stored apart
        for n in names:
            m = _LAYER_RE.match(n)
            if m and m.group(2) == parts[0]:
                gguf_parts = [f"blk.{m.group(1)}.{p}.{m.group(3)}" for p in parts]
                if all(p in gf.tensors for p in gguf_parts):
                    fused = f"blk.{m.group(1)}.{target}.{m.group(3)}"
                    source = Source(tuple(gf.tensors[p] for p in gguf_parts))
                    plan.tensors.append(OutTensor(_mlx_name(arch, fused) or fused, source))
                    taken.update(gguf_parts)
    for n in names:
        if n in taken:
            continue
        mlx_name = _mlx_name(arch, n)
        if mlx_name is None:
            known = [*_GLOBAL_NAMES, *(f"blk.N.{k}" for k in arch.layer_names)]
            raise ConversionError(
                gf.path,
                f"unsupported tensor {n} for a {arch.name} model (known: {', '.join(known)})",
            )
        shift = arch.norm_shift if mlx_name.endswith("norm.weight") else 0.0
        plan.tensors.append(OutTensor(mlx_name, Source((gf.tensors[n],)), shift))
    plan.config = arch.build_config(gf, _Meta(gf, arch.name))  # after: name the odd tensor
    return plan


def expected_parameters(config: dict[str, Any], names: list[str]) -> dict[str, tuple]:
    """{weight name: (shape, quantizable)} of the mlx-lm model that `config` builds.

    Built from mlx-lm's own model class (parameters are lazy, so nothing is allocated),
    after its `sanitize` (which drops a tied lm_head): the shapes `load` will demand.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        model.sanitize({name: None for name in names})
    modules = dict(model.named_modules())
    out = {}
    for name, value in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        quantizable = leaf == "weight" and hasattr(modules.get(module), "to_quantized")
        out[name] = (tuple(value.shape), quantizable)
    return out


def check_shapes(plan: Plan, expected: dict[str, tuple], path: Path) -> None:
    """Fail now, not at load time, if the weights do not fit the mlx-lm model."""
    model_type = plan.config["model_type"]
    have = {t.name: t.source.shape for t in plan.tensors}
    missing = sorted(expected.keys() - have.keys())
    if missing:
        raise ConversionError(path, f"missing tensors for a {model_type} model: {missing[:3]}")
    for name, shape in have.items():
        if name not in expected:
            raise ConversionError(path, f"unexpected tensor {name} for a {model_type} model")
        if shape != expected[name][0]:
            raise ConversionError(
                path, f"tensor {name} has shape {shape}, expected {expected[name][0]}"
            )
