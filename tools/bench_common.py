"""Shared pieces of the benchmark tools: prompts, statistics, /proc readings, tables.

Why: `bench_engine.py` (in-process) and `bench_server.py` (over HTTP) must build the same
prompts and compute rates the same way, or their figures cannot be set side by side. Nothing
here imports mlx, so a driver that only talks HTTP stays light.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Open-ended tasks that a 135M model answers at length, so max_tokens (not EOS) ends a run.
STORY_TOPICS = (
    "a dragon who learns to cook",
    "a lighthouse keeper who finds a talking seal",
    "a robot that wants to become a gardener",
    "two rival bakers in a small mountain town",
    "a girl who maps the stars from her rooftop",
    "a detective who solves crimes with a cat",
    "a ship lost in a sea of fog",
    "an old clockmaker and his last clock",
    "a fox who runs the village post office",
    "a city that floats above the clouds",
    "a boy who can talk to trees",
    "a library that rearranges itself at night",
)

_FILLER_WORDS = (
    "the river market winter lantern harbor engine garden stone quiet morning north bridge "
    "travelers carried letters across valley while merchants counted silver coins near old "
    "tower and children watched boats return under grey sky before rain fell on roofs of "
    "houses built by farmers who kept records of every harvest season in small notebooks"
).split()


def story_messages(index: int, nonce: str) -> list[dict[str, str]]:
    """A ~50-token chat prompt (with SmolLM2's template) that asks for a long story.

    ``nonce`` makes the prompt unique, so no server can answer it from a prompt cache.
    """
    topic = STORY_TOPICS[index % len(STORY_TOPICS)]
    content = f"[{nonce}] Write a very long story about {topic}."
    return [{"role": "user", "content": content}]


def _filler(n_sentences: int, seed: str) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_FILLER_WORDS) for _ in range(rng.randint(8, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def long_messages(
    count_tokens: Callable[[list[dict[str, str]]], int], target_tokens: int, nonce: str
) -> tuple[list[dict[str, str]], int]:
    """Chat messages whose templated prompt has about ``target_tokens`` tokens.

    The text differs from its first words on for each ``nonce`` (no shared prefix beyond the
    template's own preamble). Returns the messages and their exact token count.
    """

    def build(n: int) -> list[dict[str, str]]:
        body = _filler(n, seed=nonce)
        content = f"[{nonce}] Notes:\n{body}\n\nSummarize these notes in detail."
        return [{"role": "user", "content": content}]

    lo, hi = 1, max(2, target_tokens // 4)
    while count_tokens(build(hi)) < target_tokens:
        hi *= 2
    while lo < hi:  # the smallest sentence count reaching the target
        mid = (lo + hi) // 2
        if count_tokens(build(mid)) < target_tokens:
            lo = mid + 1
        else:
            hi = mid
    messages = build(lo)
    return messages, count_tokens(messages)


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A chat prompt's token ids the way the servers build them (template + generation prompt).

    Works with a Hugging Face tokenizer (which may answer with a BatchEncoding) and with
    mlx-lm's TokenizerWrapper.
    """
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def chat_token_counter(tokenizer: Any) -> Callable[[list[dict[str, str]]], int]:
    """A function that counts a chat prompt's tokens with ``tokenizer``."""
    return lambda messages: len(chat_tokens(tokenizer, messages))


# -- rates and statistics --------------------------------------------------------------


@dataclass
class TokenTrace:
    """When one sequence's tokens arrived (perf_counter seconds)."""

    sent_at: float
    token_times: list[float] = field(default_factory=list)
    tokens: int | None = None  # the server's count, when it reports one (usage)

    @property
    def count(self) -> int:
        return self.tokens if self.tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    def decode_rate(self) -> float | None:
        """Tokens per second after the first token: prefill is left out."""
        if len(self.token_times) < 2:
            return None
        span = self.token_times[-1] - self.token_times[0]
        return (self.count - 1) / span if span > 0 else None

    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def aggregate_decode_rate(traces: Sequence[TokenTrace]) -> float | None:
    """All sequences' tokens after their first, over the window from the earliest first
    token to the latest last one: batch decode throughput with prefill left out."""
    live = [t for t in traces if t.token_times]
    if not live:
        return None
    start = min(t.token_times[0] for t in live)
    end = max(t.token_times[-1] for t in live)
    tokens = sum(max(0, t.count - 1) for t in live)
    return tokens / (end - start) if end > start else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """min / median / max of the measured values (None entries are runs that gave nothing)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "n": len(vals),
    }


# -- processes and the machine ---------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, all its threads (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" of comm: field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mapped_libraries(pid: int, needle: str) -> list[str]:
    """Files mapped into a process whose path contains ``needle`` (e.g. libopenblas)."""
    found = set()
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and needle in parts[5]:
                found.add(parts[5].strip())
    return sorted(found)


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_line() -> str:
    """One line that says what the figures ran on, and how busy it was."""
    import platform

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"OPENBLAS_NUM_THREADS {threads}, load average {load_average()}"
    )


def openblas_path() -> str | None:
    """The OpenBLAS that trioserve loads on this CPU (cmeel-openblas's libopenblas, or the
    scipy-openblas32 shim where cmeel's build cannot run), for LD_PRELOAD of other servers;
    None if it loads none."""
    sys.path.insert(0, str(ROOT))
    import trioserve  # noqa: F401  (its import picks and loads one; import-light: no mlx)
    from trioserve.blas import loaded_library

    return loaded_library()


def default_model_dir() -> Path:
    """The embedded model's converted directory (converts it on first use)."""
    out = subprocess.run(
        [sys.executable, "-m", "trioserve", "prepare"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return Path(out.stdout.strip().splitlines()[-1])


# -- output ----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
