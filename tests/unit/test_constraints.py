"""Grammar masks on the real tokenizer: what they allow, when end-of-sequence is allowed, and
that leaving the grammar (a rejected token, a spent budget) raises instead of ending quietly."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from trioserve.engine import constraints
from trioserve.engine.constraints import (
    MAX_LEXER_STATES,
    STEP_LEXER_FUEL,
    ConstraintError,
    GrammarProcessor,
    GrammarViolation,
    build_processor,
    check_constraint,
    json_object_constraint,
    json_schema_constraint,
    make_constraint_processor,
    parser_limits,
    tool_call_constraint,
)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def drive(processor: GrammarProcessor, prompt: list[int], text_tokens: list[int]) -> np.ndarray:
    """Call the processor as mlx-lm does: first with the prompt, then once per sampled token.

    Returns the allowed-token mask after the last token.
    """
    context = list(prompt)
    logits = mx.zeros((1, VOCAB))
    out = processor(mx.array(context), logits)
    for tok in text_tokens:
        assert np.isfinite(np.array(out[0, tok])), f"token {tok} was masked out"
        context.append(tok)
        out = processor(mx.array(context), logits)
    return np.isfinite(np.array(out[0]))


def test_schema_mask_follows_the_text_and_allows_eos_only_at_the_end(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    processor = build_processor(json_schema_constraint(SCHEMA), tokenizer)
    text = '{"city": "Rome", "days": 3}'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    partial = drive(processor, [1, 2, 3], tokens[:-1])
    assert not partial[eos], "end-of-sequence before the object is complete"
    assert partial.sum() < 100, "only a few tokens can close the object"
    done = drive(build_processor(json_schema_constraint(SCHEMA), tokenizer), [1], tokens)
    assert done[eos] and done.sum() == 1, "after the object only end-of-sequence remains"


def test_first_step_allows_only_an_object_start(tokenizer):
    processor = build_processor(json_object_constraint(), tokenizer)
    allowed = drive(processor, [5, 6], [])
    texts = {tokenizer.decode([int(i)]) for i in np.nonzero(allowed)[0]}
    assert texts and all(t.startswith("{") for t in texts), sorted(texts)[:10]


def test_tool_call_grammar_accepts_the_canonical_call(tokenizer):
    constraint = tool_call_constraint(
        [("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})],
        "<tool_call>",
        "</tool_call>",
        several=False,
    )
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    text = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
    eos = next(iter(tokenizer.eos_token_ids))
    allowed = drive(
        build_processor(constraint, tokenizer),
        [1],
        tokenizer.encode(text, add_special_tokens=False),
    )
    assert allowed[eos] and allowed.sum() == 1


def test_the_call_one_step_ahead_after_the_end_is_not_an_error(tokenizer):
    # mlx-lm computes one step ahead: after the grammar's last token and the end-of-sequence
    # token it allowed, one more call comes with one more (arbitrary) token. Nothing to feed.
    eos = next(iter(tokenizer.eos_token_ids))
    processor = build_processor(json_schema_constraint(SCHEMA), tokenizer)
    tokens = tokenizer.encode('{"city": "Paris", "days": 2}', add_special_tokens=False)
    drive(processor, [1], [*tokens, eos])
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    out = processor(mx.array([1, *tokens, eos, *hello]), mx.zeros((1, VOCAB)))
    allowed = np.isfinite(np.array(out[0]))
    assert allowed[eos] and allowed.sum() == 1


def test_a_token_outside_the_grammar_raises_a_violation(tokenizer):
    processor = build_processor(json_object_constraint(), tokenizer)
    bad = tokenizer.encode("Hello", add_special_tokens=False)
    processor(mx.array([1]), mx.zeros((1, VOCAB)))
    with pytest.raises(GrammarViolation) as err:
        processor(mx.array([1, *bad]), mx.zeros((1, VOCAB)))
    message = str(err.value)
    assert message == "the output left the json_object grammar: a sampled token was rejected"
    assert "Hello" not in message, "the client-safe message quotes no model output"
    assert "Hello" in err.value.detail, "llguidance's reason stays available for debugging"
    assert isinstance(err.value, ConstraintError) and err.value.client_safe
    with pytest.raises(GrammarViolation):  # failed for good: never a quiet end-of-sequence
        processor(mx.array([1, *bad, 2]), mx.zeros((1, VOCAB)))


@pytest.mark.parametrize(
    "limit, reason",
    [({"step_lexer_fuel": 1}, "lexer error"), ({"step_max_items": 1}, "Too many items")],
)
def test_a_mask_step_out_of_budget_raises_a_violation(tokenizer, limit, reason):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    processor = build_processor(
        json_schema_constraint(schema), tokenizer, limits=parser_limits(**limit)
    )
    with pytest.raises(GrammarViolation, match=reason) as err:
        processor(mx.array([1]), mx.zeros((1, VOCAB)))
    assert str(err.value).startswith("the output left the json_schema grammar: ")
    assert "<state>" not in str(err.value) and "\n" not in str(err.value)


def test_a_grammar_past_a_compile_limit_fails_to_build(tokenizer):
    with pytest.raises(ConstraintError, match="grammar size"):
        build_processor(
            json_object_constraint(), tokenizer, limits=parser_limits(max_grammar_size=2)
        )


def test_the_limits_are_explicit_and_errors_terse():
    limits = parser_limits()
    assert limits.max_lexer_states == MAX_LEXER_STATES
    assert limits.step_lexer_fuel == STEP_LEXER_FUEL
    assert limits.verbose_errors is False


def test_the_grammar_compiles_once_and_the_ready_processor_is_handed_over(tokenizer, monkeypatch):
    made = []
    real = constraints._new_matcher

    def counting(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(constraints, "_new_matcher", counting)
    constraint = json_schema_constraint(SCHEMA)
    assert made == [], "making a Constraint compiles nothing"
    processor = build_processor(constraint, tokenizer)
    assert make_constraint_processor(processor, tokenizer) is processor
    drive(processor, [1], tokenizer.encode('{"city": "Rome", "days": 3}', add_special_tokens=False))
    assert len(made) == 1


def test_a_processor_built_on_one_thread_runs_on_another(tokenizer):
    built: list[GrammarProcessor] = []
    thread = threading.Thread(
        target=lambda: built.append(build_processor(json_schema_constraint(SCHEMA), tokenizer))
    )
    thread.start()
    thread.join()
    eos = next(iter(tokenizer.eos_token_ids))
    tokens = tokenizer.encode('{"city": "Rome", "days": 3}', add_special_tokens=False)
    done = drive(built[0], [1], tokens)
    assert done[eos] and done.sum() == 1


def test_schema_conversion_waits_for_the_build(tokenizer):
    constraint = json_schema_constraint({"type": "object", "default": {1, 2}})  # not JSON
    assert constraint.label == "json_schema"
    with pytest.raises(ConstraintError, match="invalid JSON schema"):
        build_processor(constraint, tokenizer)


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "nope"}, "Invalid type"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"$ref": "#/definitions/missing"}, "missing"),
    ],
)
def test_bad_schemas_fail_with_a_reason(tokenizer, schema, reason):
    with pytest.raises(ConstraintError, match=reason):
        check_constraint(json_schema_constraint(schema), tokenizer)
    with pytest.raises(
        ConstraintError, match=f"cannot compile the json_schema grammar: .*{reason}"
    ):
        build_processor(json_schema_constraint(schema), tokenizer)


def test_good_schema_compiles(tokenizer):
    check_constraint(json_schema_constraint(SCHEMA), tokenizer)
