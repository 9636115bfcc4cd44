"""Open a GGUF file with llama.cpp's own reader (`gguf.GGUFReader`), after a bounded scan.

Why the scan first: `GGUFReader` trusts the header. On a corrupt array count it can loop
for a very long time, and on a truncated file it fails with numpy reshape errors. The scan
below checks every length and offset against the file size in one pass, so the user gets
one line ("corrupt", "truncated") instead; then `GGUFReader` memory-maps the tensors.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor

from trioserve.models.errors import ConversionError

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_SCALAR_FORMATS.update({10: "Q", 11: "q", 12: "d"})
_STRING, _ARRAY = 8, 9


def ggml_type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"ggml type {type_id}"


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


class _Scanner:
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

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, count = self.unpack("I", what), self.unpack("Q", what)
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]), what)
            elif item_type == _STRING:
                if count > self.size:
                    raise _Corrupt(f"{what} has an impossible length")
                for _ in range(count):
                    self.take(self.unpack("Q", what), what)
            else:  # GGUFReader accepts nested arrays, but no model metadata uses them
                raise _Corrupt(f"{what} has an unsupported array item type {item_type}")
            return None  # arrays are read by GGUFReader later; the scan only checks bounds
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
                return _scan(_Scanner(buf, size), path)
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


def _scan(r: _Scanner, path: Path) -> GGUFHeader:
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
        if key in header.metadata:
            raise _Corrupt(f"duplicate metadata key {key}")
        vtype = r.unpack("I", f"metadata {key}")
        header.metadata[key] = r.value(vtype, f"metadata {key}")
    entries = []
    for i in range(n_tensors):
        name = r.string(f"tensor name #{i}")
        n_dims = r.unpack("I", f"tensor {name}")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(r.unpack("Q", f"tensor {name}") for _ in range(n_dims))
        type_id = r.unpack("I", f"tensor {name}")
        offset = r.unpack("Q", f"tensor {name}")
        header.tensors.append(TensorInfo(name, shape, ggml_type_name(type_id)))
        entries.append((name, shape, type_id, offset))
    if len({t.name for t in header.tensors}) != len(header.tensors):
        raise _Corrupt("duplicate tensor names")
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"invalid alignment {alignment}")
    data_start = -(-r.pos // alignment) * alignment
    for name, shape, type_id, offset in entries:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except ValueError:
            continue  # an unknown type: reported as unsupported by the caller
        if shape[0] % block or any(d <= 0 for d in shape):
            raise _Corrupt(f"tensor {name} has an invalid shape {shape}")
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > r.size:
            raise _Corrupt(f"tensor {name} extends past the end of the file (truncated?)")
    return header


def _plain(value: Any) -> Any:
    """numpy scalars (from GGUFReader) as Python values; lists stay lists."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class GGUFFile:
    """A validated, memory-mapped GGUF file: plain metadata and tensors by name."""

    path: Path
    header: GGUFHeader
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]


def check_tensor_types(header: GGUFHeader, path: Path, supported: tuple[str, ...]) -> None:
    """Raise ConversionError on a tensor whose type we cannot read (before GGUFReader,
    which raises a bare ValueError on unknown type ids)."""
    for t in header.tensors:
        if t.type_name not in supported:
            raise ConversionError(
                path,
                f"unsupported tensor type {t.type_name} of {t.name} "
                f"(supported: {', '.join(supported)})",
            )


def open_gguf(path: Path, header: GGUFHeader | None = None) -> GGUFFile:
    """Open a GGUF file whose header was scanned (scanned here if `header` is None)."""
    path = Path(path)
    header = header or scan_gguf(path)
    try:
        reader = GGUFReader(path, "r")
        metadata = {
            key: _plain(f.contents())
            for key, f in reader.fields.items()
            if not key.startswith("GGUF.")  # the reader's pseudo-fields (version, counts)
        }
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise ConversionError(path, f"corrupt GGUF file: {exc}") from exc
    except OSError as exc:
        raise ConversionError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    return GGUFFile(path, header, metadata, {t.name: t for t in reader.tensors})


def read_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata as plain Python values (str, int, float, bool, lists)."""
    return open_gguf(path).metadata
