"""GGUF tensors to numpy: float32 for every type gguf-py reads, MLX triplets where exact.

Why gguf-py and not `mx.load`: MLX 0.32's GGUF reader returns wrong values for Q4_K and
cannot read Q5_0, Q5_1, Q3_K, Q5_K or the IQ types; llama.cpp's own numpy code reads all.
`ReaderTensor.data` is already row-major (GGUFReader reverses ggml's fastest-first dims),
with the last axis holding whole quant blocks, so rows can be dequantized in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf import quants as gguf_quants

Q = GGMLQuantizationType
_FLOAT_TYPES = (Q.F32, Q.F16, Q.F64)
# Every type that gguf-py can dequantize (BF16, the legacy, K- and IQ quants, ...).
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = tuple(
    t.name for t in (*_FLOAT_TYPES, *sorted(gguf_quants._type_traits))
)
# ggml types whose blocks are exactly MLX affine groups of 32: type -> bits.
MLX_AFFINE_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}
GROUP_SIZE = 32
_CHUNK_ELEMENTS = 1 << 22  # dequantize ~16 MB of float32 at a time: bounded temporaries


@dataclass(frozen=True)
class Source:
    """One output tensor's data: one GGUF tensor, or several fused along rows (axis 0)."""

    parts: tuple[ReaderTensor, ...]

    @property
    def qtype(self) -> GGMLQuantizationType | None:
        """The common ggml type of the parts, or None if they differ."""
        types = {p.tensor_type for p in self.parts}
        return types.pop() if len(types) == 1 else None

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major element shape of the (fused) tensor."""
        shapes = [tuple(int(d) for d in reversed(p.shape.tolist())) for p in self.parts]
        if len(shapes) == 1:
            return shapes[0]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    @property
    def names(self) -> str:
        return "+".join(p.name for p in self.parts)


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """One GGUF tensor as a row-major float32 array of its element shape."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = t.data
    if t.tensor_type in _FLOAT_TYPES:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    # Row by row block groups, so that gguf-py's temporaries stay small on huge tensors.
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = gguf_quants.dequantize(
            rows[start : start + step], t.tensor_type
        )
    return out.reshape(shape)


def dequantize_source(src: Source) -> np.ndarray:
    """A (possibly fused) source as float32."""
    if len(src.parts) == 1:
        return dequantize_tensor(src.parts[0])
    return np.concatenate([dequantize_tensor(p) for p in src.parts], axis=0)


def mlx_affine_bits(src: Source) -> int | None:
    """4 or 8 when the source's blocks map exactly onto MLX affine groups of 32, else None."""
    qtype = src.qtype
    if qtype not in MLX_AFFINE_BITS or len(src.shape) != 2:
        return None
    return MLX_AFFINE_BITS[qtype]


def _blocks(t: ReaderTensor) -> np.ndarray:
    """The raw blocks of a 2-D quantized tensor: (rows, blocks per row, bytes per block)."""
    _, type_size = GGML_QUANT_SIZES[t.tensor_type]
    data = np.asarray(t.data, dtype=np.uint8)
    return data.reshape(data.shape[0], -1, type_size)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def to_mlx_affine(src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight uint32, scales float16, biases float16) equal to the ggml blocks, exactly.

    MLX affine: w = scale * q + bias with unsigned q packed little-endian, value j of a
    group at bits [bits*j, bits*(j+1)) of consecutive uint32 words; ggml:
    Q4_0 d*(q-8) -> (d, -8d); Q4_1 d*q+m -> (d, m); Q8_0 d*q, q signed -> (d, -128d) on q+128.
    Returns float32 scales and biases; they are exact in float16 too (d and m are float16,
    and scaling by 8 or 128 is exact unless it overflows).
    """
    weights, scales, biases = [], [], []
    for t in src.parts:
        b = _blocks(t)
        d = _f16(b[..., 0:2]).astype(np.float32)
        if t.tensor_type == Q.Q8_0:
            q = b[..., 2:34] ^ np.uint8(0x80)  # int8 two's complement + 128 as uint8
            bias = d * np.float32(-128)
        else:
            qs = b[..., 4:20] if t.tensor_type == Q.Q4_1 else b[..., 2:18]
            # ggml: low nibbles hold values 0..15, high nibbles 16..31 of the block.
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
            q = q[..., 0::2] | (q[..., 1::2] << 4)  # MLX: value 2i low nibble, 2i+1 high
            bias = _f16(b[..., 2:4]).astype(np.float32) if t.tensor_type == Q.Q4_1 else d * -8
        rows = b.shape[0]
        weights.append(np.ascontiguousarray(q).view(np.uint32).reshape(rows, -1))
        scales.append(d)
        biases.append(bias)
    return (
        np.concatenate(weights, axis=0),
        np.concatenate(scales, axis=0),
        np.concatenate(biases, axis=0),
    )
