"""Convert a GGUF file into an mlx-lm model directory, atomically.

Why: no model hub is reachable, but a GGUF file holds weights, hyper-parameters and the
tokenizer. We dequantize with llama.cpp's own reader (exact for every quant type), keep
Q4_0/Q4_1/Q8_0 as MLX affine triplets when asked ("quantized": fast on Metal, slower
than float32 with OpenBLAS on the Linux CPU backend), and write a plain mlx-lm directory
(config.json, model.safetensors, tokenizer files). Tensors are dequantized and written one
at a time (the GGUF is memory-mapped and safetensors is streamed), so the peak memory is
about one tensor, not a model.
The output appears atomically: it is built in a temporary sibling directory, renamed into
place only when complete, and marked complete by COMPLETE_MARKER.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from trioserve.models.errors import ConversionError, OutputExistsError
from trioserve.models.gguf.architectures import (
    OutTensor,
    architecture_for,
    check_shapes,
    expected_parameters,
    plan_conversion,
)
from trioserve.models.gguf.dequantize import (
    GROUP_SIZE,
    SUPPORTED_TENSOR_TYPES,
    dequantize_source,
    mlx_affine_bits,
    to_mlx_affine,
)
from trioserve.models.gguf.reader import check_tensor_types, open_gguf, scan_gguf
from trioserve.models.tokenizer import TokenizerMetadataError, write_tokenizer_files

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "quantized")
# Written last into a converted directory; its presence means the conversion completed.
COMPLETE_MARKER = "trioserve-complete.json"
# Bump when the output of the converter changes, so cached conversions are redone.
CONVERTER_VERSION = 2
TEMP_INFIX = ".tmp-"

Progress = Callable[[str], None]


def default_dtype() -> str:
    """ "float32" on the CPU (MLX's CPU 4-bit kernels are slower than float32 with
    OpenBLAS), "quantized" on a GPU (Metal), where the 4/8-bit kernels are the fast path."""
    import mlx.core as mx

    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "quantized"


def concrete_dtype(dtype: str) -> str:
    """`dtype` with "auto" replaced by this device's `default_dtype()`."""
    return default_dtype() if dtype == "auto" else dtype


def quantized_float_dtype() -> str:
    """The float dtype of the scales, biases and unquantized tensors of a "quantized"
    conversion: float16 on a GPU; float32 on the CPU, whose quantized matmul accumulates in
    the activations' dtype (measured, mlx 0.32.4: a 576-wide float16 product off by 0.15,
    and SmolLM2 no longer answering "Paris"; exact in float32)."""
    import mlx.core as mx

    return "F32" if mx.default_device().type == mx.DeviceType.cpu else "F16"


# ---------------------------------------------------------------- safetensors, streamed


@dataclass(frozen=True)
class _Item:
    name: str
    dtype: str  # safetensors dtype: F32, F16, BF16, U32
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Job:
    """Output arrays produced together (a float tensor, or an MLX triplet)."""

    items: tuple[_Item, ...]
    produce: Callable[[], list[np.ndarray]]


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
_NP_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (as MLX's astype)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def write_safetensors(
    file: IO[bytes], jobs: list[_Job], metadata: dict[str, str], tick: Callable[[], None]
) -> None:
    """Write a safetensors file to `file`, producing each job's arrays only when its turn
    comes (the header is computed from the planned shapes first)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for job in jobs:
        for item in job.items:
            size = int(np.prod(item.shape, dtype=np.int64)) * _ITEMSIZE[item.dtype]
            header[item.name] = {
                "dtype": item.dtype,
                "shape": list(item.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    file.write(struct.pack("<Q", len(blob)) + blob)
    for job in jobs:
        arrays = job.produce()
        for item, array in zip(job.items, arrays, strict=True):
            array = np.ascontiguousarray(array, dtype=_NP_DTYPE[item.dtype])
            if array.shape != item.shape:  # a bug here, never the user's file
                raise RuntimeError(f"{item.name}: produced {array.shape}, planned {item.shape}")
            file.write(memoryview(array.reshape(-1)).cast("B"))
        del arrays
        tick()


def _float_job(t: OutTensor, st_dtype: str) -> _Job:
    def produce() -> list[np.ndarray]:
        x = dequantize_source(t.source)
        if t.subtract:
            x = x - np.float32(t.subtract)
        if st_dtype == "BF16":
            return [_to_bfloat16_bits(x)]
        return [x.astype(_NP_DTYPE[st_dtype], copy=False)]

    return _Job((_Item(t.name, st_dtype, t.source.shape),), produce)


def _affine_job(t: OutTensor, bits: int, st_dtype: str, path: Path) -> _Job:
    rows, cols = t.source.shape
    base = t.name.removesuffix(".weight")
    items = (
        _Item(t.name, "U32", (rows, cols * bits // 32)),
        _Item(f"{base}.scales", st_dtype, (rows, cols // GROUP_SIZE)),
        _Item(f"{base}.biases", st_dtype, (rows, cols // GROUP_SIZE)),
    )

    def produce() -> list[np.ndarray]:
        weight, scales, biases = to_mlx_affine(t.source)
        with np.errstate(over="ignore"):
            scales, biases = (a.astype(_NP_DTYPE[st_dtype]) for a in (scales, biases))
        if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
            raise ConversionError(path, f"{t.source.names} has scales beyond {st_dtype}")
        return [weight, scales, biases]

    return _Job(items, produce)


def _plan_jobs(
    tensors: list[OutTensor], expected: dict[str, tuple], dtype: str, path: Path
) -> tuple[list[_Job], dict[str, Any] | None]:
    """The write jobs, and config.json's `quantization` entry (None: nothing quantized)."""
    float_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    float_dtype = float_dtype or quantized_float_dtype()
    jobs, per_layer = [], {}
    for t in tensors:
        quantizable = expected[t.name][1]
        bits = mlx_affine_bits(t.source) if dtype == "quantized" and quantizable else None
        if bits and not t.subtract:
            jobs.append(_affine_job(t, bits, float_dtype, path))
            per_layer[t.name.removesuffix(".weight")] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            jobs.append(_float_job(t, float_dtype))
            if quantizable and dtype == "quantized":
                per_layer[t.name.removesuffix(".weight")] = False
    if not any(per_layer.values()):
        return jobs, None
    # mlx-lm's load_model reads per-module entries (dict or False) before the defaults.
    common = Counter(v["bits"] for v in per_layer.values() if v).most_common(1)[0][0]
    return jobs, {"group_size": GROUP_SIZE, "bits": common, **per_layer}


# ---------------------------------------------------------------- the output directory


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


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="tensor",
        desc="dequantizing",
        file=sys.stderr,
        leave=False,
        disable=not sys.stderr.isatty(),
    )


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Convert a GGUF file (llama, qwen2, qwen3, gemma3, phi3) into an mlx-lm directory
    at `out_dir`, atomically. `dtype` is one of SUPPORTED_DTYPES.

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
    arch = architecture_for(header.metadata.get("general.architecture"), gguf_path)
    check_tensor_types(header, gguf_path, SUPPORTED_TENSOR_TYPES)
    say(f"reading {gguf_path} ({len(header.tensors)} tensors, {arch.name})")
    gf = open_gguf(gguf_path, header)
    try:
        plan = plan_conversion(gf, arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(gguf_path, f"malformed GGUF metadata: {exc!r}") from exc
    config = plan.config
    try:
        expected = expected_parameters(config, [t.name for t in plan.tensors])
    except Exception as exc:  # mlx-lm rejecting the config, in whatever way it does
        raise ConversionError(
            gguf_path, f"mlx-lm cannot build a {config['model_type']} model: {exc!r}"
        ) from exc
    check_shapes(plan, expected, gguf_path)
    jobs, quantization = _plan_jobs(plan.tensors, expected, dtype, gguf_path)
    if quantization:
        config["quantization"] = quantization

    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(out_dir)
        say(f"writing {dtype} weights to {out_dir}")
        with _progress_bar(len(jobs)) as bar, open(tmp / "model.safetensors", "wb") as f:
            write_safetensors(f, jobs, {"format": "mlx"}, bar.update)
        _write_json(tmp / "config.json", config)
        try:
            write_tokenizer_files(gf.metadata, tmp, config["max_position_embeddings"])
        except (TokenizerMetadataError, KeyError) as exc:
            raise ConversionError(gguf_path, f"cannot rebuild the tokenizer: {exc}") from exc
        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "architecture": arch.name,
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
    except (ValueError, MemoryError) as exc:  # numpy reading the (memory-mapped) tensors
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
