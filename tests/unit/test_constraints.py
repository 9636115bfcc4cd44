"""Grammar masks on the real tokenizer: what they allow, and when end-of-sequence is allowed."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from trioserve.engine.constraints import (
    ConstraintError,
    GrammarProcessor,
    check_constraint,
    json_object_constraint,
    json_schema_constraint,
    tool_call_constraint,
)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def drive(processor: GrammarProcessor, prompt: list[int], text_tokens: list[int]) -> np.ndarray:
    """Call the processor as mlx-lm does: first with the prompt, then once per sampled token.

    Returns the allowed-token mask after the last token.
    """
    vocab = 49152
    context = list(prompt)
    logits = mx.zeros((1, vocab))
    out = processor(mx.array(context), logits)
    for tok in text_tokens:
        assert np.isfinite(np.array(out[0, tok])), f"token {tok} was masked out"
        context.append(tok)
        out = processor(mx.array(context), logits)
    return np.isfinite(np.array(out[0]))


def test_schema_mask_follows_the_text_and_allows_eos_only_at_the_end(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    processor = GrammarProcessor(json_schema_constraint(SCHEMA), tokenizer)
    text = '{"city": "Rome", "days": 3}'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    partial = drive(processor, [1, 2, 3], tokens[:-1])
    assert not partial[eos], "end-of-sequence before the object is complete"
    assert partial.sum() < 100, "only a few tokens can close the object"
    done = drive(GrammarProcessor(json_schema_constraint(SCHEMA), tokenizer), [1], tokens)
    assert done[eos] and done.sum() == 1, "after the object only end-of-sequence remains"


def test_first_step_allows_only_an_object_start(tokenizer):
    processor = GrammarProcessor(json_object_constraint(), tokenizer)
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
        GrammarProcessor(constraint, tokenizer),
        [1],
        tokenizer.encode(text, add_special_tokens=False),
    )
    assert allowed[eos] and allowed.sum() == 1


def test_a_token_outside_the_grammar_forces_end_of_sequence(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    processor = GrammarProcessor(json_object_constraint(), tokenizer)
    bad = tokenizer.encode("Hello", add_special_tokens=False)
    processor(mx.array([1]), mx.zeros((1, 49152)))
    out = processor(mx.array([1, *bad]), mx.zeros((1, 49152)))
    allowed = np.isfinite(np.array(out[0]))
    assert allowed[eos] and allowed.sum() == 1


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


def test_good_schema_compiles(tokenizer):
    check_constraint(json_schema_constraint(SCHEMA), tokenizer)
