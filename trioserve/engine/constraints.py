"""Constrained decoding: a grammar's token mask applied as an mlx-lm logits processor.

Why llguidance: it installs from PyPI as one abi3 wheel with no dependencies (no torch, unlike
xgrammar), reads our Hugging Face ``tokenizers`` tokenizer directly, compiles JSON schemas and
Lark grammars lazily (no vocabulary-wide precomputation per schema, unlike outlines-core), and
computes a mask in tens of microseconds. Its grammars are plain strings, so a request carries
a picklable ``Constraint`` and the MLX worker builds the matcher on its own thread.

Each sequence gets its own ``GrammarProcessor``. mlx-lm calls it once per decode step with that
sequence's token context: it feeds the tokens sampled since the last call to the matcher, then
masks every token the grammar forbids. End-of-sequence tokens are allowed only where the grammar
accepts, so a constrained answer ends only when it is complete (or at ``max_tokens``).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Compact but readable JSON: no free whitespace, so a small model cannot loop on newlines
# inside an object; a schema's own "x-guidance" options still take precedence.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class ConstraintError(ValueError):
    """The grammar cannot be compiled; the message says why (safe to show a client)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled-on-demand grammar: llguidance's grammar text plus a label for logs."""

    grammar: str
    label: str


def json_schema_constraint(schema: dict[str, Any], label: str = "json_schema") -> Constraint:
    """Output must be one JSON value valid against ``schema``."""
    try:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from None
    return Constraint(grammar, label)


def json_object_constraint() -> Constraint:
    """Output must be one JSON object (OpenAI's ``response_format: json_object``)."""
    return json_schema_constraint({"type": "object"}, label="json_object")


def lark_constraint(lark: str, label: str) -> Constraint:
    """Output must match a Lark grammar (llguidance dialect, ``%json {...}`` allowed)."""
    import llguidance

    return Constraint(llguidance.LLMatcher.grammar_from_lark(lark), label)


def tool_call_constraint(
    calls: list[tuple[str, dict[str, Any]]],
    start: str,
    end: str,
    *,
    several: bool,
) -> Constraint:
    """One (or, with ``several``, one or more) ``start {"name":..,"arguments":..} end`` blocks.

    ``calls`` pairs each allowed function name with its parameters' JSON schema.
    """
    options = []
    for name, parameters in calls:
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters or {}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    block = (
        f"{json.dumps(start)} {json.dumps(chr(10))} call {json.dumps(chr(10))} {json.dumps(end)}"
    )
    rules = [
        "start: block+" if several else "start: block",
        f"block: {block}",
        f"call: %json {json.dumps(schema)}",
    ]
    return lark_constraint("\n".join(rules), "tool_call")


# -- the llguidance tokenizer, built once per tokenizer (about a second) ----------------------

_tokenizers: dict[int, Any] = {}
_tokenizers_lock = threading.Lock()


def llg_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of an mlx-lm ``TokenizerWrapper``; cached, safe from any thread."""
    key = id(tokenizer)
    with _tokenizers_lock:
        cached = _tokenizers.get(key)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        import llguidance.hf

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        try:
            llt = llguidance.hf.from_tokenizer(hf, eos_token=sorted(tokenizer.eos_token_ids))
        except Exception as exc:  # slow tokenizers and exotic vocabularies
            raise ConstraintError(
                f"constrained decoding is not available for this tokenizer: {exc}"
            ) from None
        _tokenizers[key] = (tokenizer, llt)
        return llt


def check_constraint(constraint: Constraint, tokenizer: Any) -> None:
    """Raise ``ConstraintError`` with llguidance's reason if the grammar cannot compile.

    The first call per tokenizer builds llguidance's tokenizer: run it in a thread.
    """
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        constraint.grammar, llg_tokenizer(tokenizer)
    )
    if is_error:
        raise ConstraintError(f"cannot compile the {constraint.label} grammar: {messages[0]}")
    for warning in messages:
        log.debug("%s grammar warning: %s", constraint.label, warning)


class GrammarProcessor:
    """An mlx-lm logits processor that keeps one sequence inside a grammar.

    Called on the MLX worker thread only. The first call sees the prompt; every later call
    sees exactly the tokens sampled since, which it feeds to the matcher before masking.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any) -> None:
        import llguidance

        llt = llg_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(llt, constraint.grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        self._label = constraint.label
        self._eos = np.array(sorted(tokenizer.eos_token_ids), dtype=np.int64)
        self._words = np.full((llt.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._seen: int | None = None
        self._failed = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        n = int(tokens.shape[-1])
        if self._seen is None:
            self._seen = n  # the prompt: nothing sampled yet
        elif n > self._seen:
            new = tokens[self._seen :].tolist()
            self._seen = n
            # mlx-lm computes one step ahead, so after the grammar's final token (and the
            # end-of-sequence token it then allows) a call may still come: nothing to feed.
            if not self._matcher.is_stopped() and not self._matcher.consume_tokens(new):
                self._failed = True
                log.warning(
                    "%s grammar rejected a token: %s", self._label, self._matcher.get_error()
                )
        allowed = self._allowed(int(logits.shape[-1]))
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    def _allowed(self, vocab: int) -> np.ndarray:
        """One bool per logit: the grammar's mask, or only end-of-sequence after an error."""
        if self._failed:
            allowed = np.zeros(vocab, dtype=np.bool_)
            allowed[self._eos[self._eos < vocab]] = True
            return allowed
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little").view(np.bool_)
        if bits.size >= vocab:
            return bits[:vocab]
        return np.concatenate([bits, np.zeros(vocab - bits.size, dtype=np.bool_)])


def make_constraint_processor(constraint: Constraint, tokenizer: Any) -> GrammarProcessor:
    """The logits processor for one sequence; build it on the MLX worker thread."""
    return GrammarProcessor(constraint, tokenizer)
