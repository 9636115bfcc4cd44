"""Will a model fit? Its resident size estimated from disk, and what the system has free.

A loaded mlx-lm model holds its weights as they are on disk (a float32 conversion is written
as float32; quantized tensors stay packed), so the weight files' sizes are a close estimate of
what loading adds; the KV cache per slot comes on top, bounded by ``--ctx-size``. Refusing a
load that cannot fit beats swapping the whole machine into the ground.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

GIB = 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".bin", ".gguf")

# Reads the bytes the system can give without swapping; None where that is unknown.
MemoryReader = Callable[[], int | None]


def weight_bytes(model_dir: Path) -> int:
    """Sum of the weight files' sizes in an mlx-lm directory (0 where none are found)."""
    total = 0
    for path in Path(model_dir).iterdir():
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            total += path.stat().st_size
    return total


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (Linux); None where it cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"
