"""Constrained decoding: a grammar's token mask applied as an mlx-lm logits processor.

Why llguidance: it installs from PyPI as one abi3 wheel with no dependencies (no torch, unlike
xgrammar), reads our Hugging Face ``tokenizers`` tokenizer directly, compiles JSON schemas and
Lark grammars lazily (no vocabulary-wide precomputation per schema, unlike outlines-core), and
computes a mask in tens of microseconds.

Three steps, on three threads:

- A ``Constraint`` says what the output must follow, as the request stated it (a JSON schema, a
  Lark grammar, the tools a forced call may use). Making one is cheap and converts nothing, so
  the request handler builds it on the Trio thread.
- ``build_processor`` converts it to llguidance's grammar text, compiles the grammar once under
  the explicit ``PARSER_LIMITS`` and returns the sequence's ready ``GrammarProcessor``, or raises
  ``ConstraintError`` (the first call per tokenizer also builds llguidance's tokenizer, about a
  second). It is sync and costly: the request path runs it in its ``trio.to_thread`` prepare
  step, never on the Trio thread nor on the MLX worker thread.
- The MLX worker appends the ready processor to the sequence's logits processors. mlx-lm calls
  it once per decode step with that sequence's token context: it feeds the tokens sampled since
  the last call to the matcher, then masks every token the grammar forbids. End-of-sequence
  tokens are allowed only where the grammar accepts, so a constrained answer ends only when it is
  complete (or at ``max_tokens``). A sampled token the grammar rejects, or a mask step that runs
  out of budget, raises ``GrammarViolation``: the worker fails that request with an error, so a
  constrained answer never ends ``stop`` with invalid output.

llguidance matchers may move between threads (built in the prepare thread, used on the MLX
thread); a ``GrammarProcessor`` holds no other thread-bound state and serves exactly one sequence.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import numpy as np

log = logging.getLogger(__name__)

# Compact but readable JSON: no free whitespace, so a small model cannot loop on newlines
# inside an object; a schema's own "x-guidance" options still take precedence.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

# -- llguidance's parser limits, explicit so they do not move with the library's defaults -------
# Passed both when validating (check_constraint) and when building the matcher. The speeds are
# llguidance's own estimates. Compile-time limits bound the prepare thread; the per-step limits
# bound what one constrained sequence may add to every decode step on the MLX thread. A grammar
# past a compile-time limit is a 400; a step past its limit raises GrammarViolation mid-answer.

# Branching of one grammar row (e.g. the alternatives of one rule). llguidance's default.
MAX_ITEMS_IN_ROW = 2_000
# Compile: work to build the lexer's regexes, ~50k/ms, so about 20 ms. llguidance's default.
INITIAL_LEXER_FUEL = 1_000_000
# Per mask step: lexer work, ~14k/ms, so at most about 15 ms added to a decode step. A JSON
# schema step uses a few thousand. llguidance's default.
STEP_LEXER_FUEL = 200_000
# Per mask step: Earley items, ~20k/ms, so at most about 2.5 ms. llguidance's default.
STEP_MAX_ITEMS = 50_000
# Lexer states kept per matcher, 1-2 kB each: at most about 100 MB per request (llguidance's
# default of 250_000 would allow 500 MB per request, times --parallel). Real JSON schemas use
# hundreds.
MAX_LEXER_STATES = 50_000
# Symbols in the compiled grammar: bounds a huge schema (the body may be 8 MiB). Default.
MAX_GRAMMAR_SIZE = 500_000
# Run large regexes over the token trie when compiling: costlier compile (in the prepare
# thread), cheaper masks (on the MLX thread). llguidance's default.
PRECOMPUTE_LARGE_LEXEMES = True
# No parser state in error messages: they reach clients and logs, and the state quotes the
# model's output.
VERBOSE_ERRORS = False


def parser_limits(**overrides: Any) -> Any:
    """The ``llguidance.LLParserLimits`` from the constants above (``overrides`` for tests)."""
    import llguidance

    values: dict[str, Any] = {
        "max_items_in_row": MAX_ITEMS_IN_ROW,
        "initial_lexer_fuel": INITIAL_LEXER_FUEL,
        "step_lexer_fuel": STEP_LEXER_FUEL,
        "step_max_items": STEP_MAX_ITEMS,
        "max_lexer_states": MAX_LEXER_STATES,
        "max_grammar_size": MAX_GRAMMAR_SIZE,
        "precompute_large_lexemes": PRECOMPUTE_LARGE_LEXEMES,
        "verbose_errors": VERBOSE_ERRORS,
    }
    return llguidance.LLParserLimits(**{**values, **overrides})


class ConstraintError(ValueError):
    """The grammar cannot be compiled; the message says why (safe to show a client)."""

    client_safe = True  # the worker passes the message of such an error on to the client


class GrammarViolation(ConstraintError):
    """The output left the grammar mid-answer: a sampled token was rejected, or a mask step
    ran out of budget. Raised from ``GrammarProcessor.__call__``; the message is safe to show a
    client and to log (it quotes no model output, hence ``client_safe``); ``detail`` has
    llguidance's own reason, which may quote model tokens: debug logs only.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Constraint:
    """What the output must follow, as the request gave it, plus a label for messages and logs.

    Cheap to make and converts nothing: ``grammar()`` does the conversion to llguidance's grammar
    text, and ``build_processor`` calls it in the request's prepare thread.
    """

    label: str
    make: Callable[[], str] = field(repr=False, compare=False)  # the grammar text, on demand

    def grammar(self) -> str:
        """llguidance's grammar text; raises ``ConstraintError``. Costs O(schema size)."""
        return self.make()


def json_schema_constraint(schema: dict[str, Any], label: str = "json_schema") -> Constraint:
    """Output must be one JSON value valid against ``schema``."""
    return Constraint(label, partial(_json_schema_grammar, schema))


def json_object_constraint() -> Constraint:
    """Output must be one JSON object (OpenAI's ``response_format: json_object``)."""
    return json_schema_constraint({"type": "object"}, label="json_object")


def lark_constraint(lark: str, label: str) -> Constraint:
    """Output must match a Lark grammar (llguidance dialect, ``%json {...}`` allowed)."""
    return Constraint(label, partial(_lark_grammar, lark))


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
    return Constraint("tool_call", partial(_tool_call_grammar, list(calls), start, end, several))


def _json_schema_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from None


def _lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def _tool_call_grammar(
    calls: list[tuple[str, dict[str, Any]]], start: str, end: str, several: bool
) -> str:
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
    return _lark_grammar("\n".join(rules))


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


def check_constraint(constraint: Constraint, tokenizer: Any, *, limits: Any = None) -> None:
    """Raise ``ConstraintError`` with llguidance's reason if the grammar cannot compile.

    Validation only (no matcher); the request path uses ``build_processor`` instead, which
    compiles once and keeps the result. Sync and costly: run it in a thread.
    """
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        constraint.grammar(), llg_tokenizer(tokenizer), limits=limits or parser_limits()
    )
    if is_error:
        raise ConstraintError(f"cannot compile the {constraint.label} grammar: {messages[0]}")
    for warning in messages:
        log.debug("%s grammar warning: %s", constraint.label, warning)


def _new_matcher(llt: Any, grammar: str, limits: Any) -> Any:
    """The one place an ``LLMatcher`` is made (tests count the calls)."""
    import llguidance

    return llguidance.LLMatcher(llt, grammar, log_level=0, limits=limits)


def _panicked(exc: BaseException) -> bool:
    """A pyo3 panic from llguidance: a ``BaseException`` that fails this sequence only."""
    return type(exc).__name__ == "PanicException"


class GrammarProcessor:
    """An mlx-lm logits processor that keeps one sequence inside a grammar.

    Constructing one compiles the grammar (sync, costly: see ``build_processor``, the function
    to call). It is then called on the MLX worker thread only. The first call sees the prompt;
    every later call sees exactly the tokens sampled since, which it feeds to the matcher before
    masking. Serves exactly one sequence; once it has raised ``GrammarViolation`` every later
    call raises it again.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any, *, limits: Any = None) -> None:
        grammar = constraint.grammar()  # the schema -> grammar conversion
        llt = llg_tokenizer(tokenizer)
        try:
            self._matcher = _new_matcher(llt, grammar, limits or parser_limits())
        except BaseException as exc:  # llguidance raises only on API misuse, or panics
            if not isinstance(exc, Exception) and not _panicked(exc):
                raise
            raise ConstraintError(f"cannot compile the {constraint.label} grammar: {exc}") from None
        if self._matcher.is_error():
            reason = _first_line(self._matcher.get_error())
            raise ConstraintError(f"cannot compile the {constraint.label} grammar: {reason}")
        for warning in self._matcher.get_grammar_warnings():
            log.debug("%s grammar warning: %s", constraint.label, warning)
        self.label = constraint.label
        self.constraint = constraint  # what other ranks compile again (distributed)
        self._words = np.full((llt.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._seen: int | None = None
        self._violation: GrammarViolation | None = None

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        if self._violation is not None:
            raise self._violation
        n = int(tokens.shape[-1])
        if self._seen is None:
            self._seen = n  # the prompt: nothing sampled yet
        elif n > self._seen:
            new = tokens[self._seen :].tolist()
            self._seen = n
            # mlx-lm computes one step ahead, so after the grammar's final token (and the
            # end-of-sequence token it then allows) a call may still come: nothing to feed.
            if not self._matcher.is_stopped():
                self._guarded(
                    self._matcher.consume_tokens, new, what="a sampled token was rejected"
                )
        allowed = self._allowed(int(logits.shape[-1]))
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    def _allowed(self, vocab: int) -> np.ndarray:
        """One bool per logit: the grammar's mask."""
        self._guarded(
            self._matcher.unsafe_compute_mask_ptr,
            self._words.ctypes.data,
            self._words.nbytes,
            what="the next-token mask could not be computed",
        )
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little").view(np.bool_)
        if bits.size >= vocab:
            return bits[:vocab]
        return np.concatenate([bits, np.zeros(vocab - bits.size, dtype=np.bool_)])

    def _guarded(self, call: Callable[..., Any], *args: Any, what: str) -> None:
        """Run one matcher call; raise ``GrammarViolation`` if it failed or left an error."""
        try:
            ok = call(*args) is not False
        except Exception as exc:
            self._fail(what, f"{type(exc).__name__}: {exc}")
        except BaseException as exc:
            if not _panicked(exc):
                raise
            self._fail(what, f"llguidance panicked: {exc}")
        if not ok or self._matcher.is_error():
            error = self._matcher.get_error()
            if ok:  # the step ran out of budget (the reason names a limit, not model output)
                what = _first_line(error) or what
            self._fail(what, error)

    def _fail(self, what: str, detail: str) -> NoReturn:
        # The detail may quote model tokens: debug only; the client gets the error event.
        log.debug("%s grammar: %s (%s)", self.label, what, detail)
        self._violation = GrammarViolation(
            f"the output left the {self.label} grammar: {what}", detail
        )
        raise self._violation


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def build_processor(
    constraint: Constraint, tokenizer: Any, *, limits: Any = None
) -> GrammarProcessor:
    """Compile ``constraint`` once into one sequence's ready logits processor.

    Converts the schema or Lark text to llguidance's grammar, builds the ``LLMatcher`` under
    ``limits`` (default ``parser_limits()``) and checks it; raises ``ConstraintError`` (a 400)
    when the grammar cannot compile. Sync and costly (the first call per tokenizer also builds
    llguidance's tokenizer): run it in the request's ``trio.to_thread`` prepare step, never on
    the Trio thread nor on the MLX worker thread.
    """
    return GrammarProcessor(constraint, tokenizer, limits=limits)


def make_constraint_processor(
    constraint: Constraint | GrammarProcessor, tokenizer: Any
) -> GrammarProcessor:
    """The logits processor for one sequence, for the MLX worker.

    A ready ``GrammarProcessor`` (from ``build_processor``) is returned as it is. A bare
    ``Constraint`` is still compiled here, on the calling thread; that is the old path, kept
    until every request hands over a ready processor.
    """
    if isinstance(constraint, GrammarProcessor):
        return constraint
    return build_processor(constraint, tokenizer)
