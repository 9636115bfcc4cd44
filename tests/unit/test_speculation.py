"""Speculative decoding's parts, on a tiny random Llama (no real model): drafters (the draft
model's too), the acceptance rule's distribution, and the batched verification with its KV
cache re-alignment.
"""

from __future__ import annotations

import itertools
import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler

from trioserve.engine.draft_model import ModelDrafter
from trioserve.engine.prefill_gate import install_prefill_gates
from trioserve.engine.sampling import SeededSampler
from trioserve.engine.speculation import (
    PROMPT_LOOKUP,
    LookupDrafter,
    SpecBatchGenerator,
    SpecRow,
    SpeculationConfig,
    accept_point_draft,
)

VOCAB = 61


# -- drafters ------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = LookupDrafter(PROMPT_LOOKUP, source=None, ngram_min=2, ngram_max=3)
    d.observe([5, 6, 7, 8, 9, 1, 2, 5, 6])
    assert d.propose(3) == [7, 8, 9]
    d.observe([7, 8])  # the copy goes on: the drafter follows it without searching
    assert d.propose(4) == [9, 1, 2, 5]
    d.observe([42])  # one token in place of the source's (a rename): the copy resumes after it
    assert d.propose(4) == [1, 2, 5, 6]
    d.observe([43, 44])  # two misses in a row: no match any more
    assert d.propose(4) == []


def test_prompt_lookup_prefers_the_longest_suffix():
    d = LookupDrafter(PROMPT_LOOKUP, source=None, ngram_min=1, ngram_max=3)
    d.observe([1, 2, 3, 10, 9, 2, 3, 20, 1, 2, 3])
    assert d.propose(1) == [10]  # [1, 2, 3] matched, not the later [2, 3]


def test_prediction_drafts_from_the_start_and_finds_its_place_again():
    d = LookupDrafter(
        "prediction", source=[1, 2, 3, 4, 5, 6, 7, 8], ngram_min=2, ngram_max=3, start_ptr=0
    )
    assert d.propose(3) == [1, 2, 3]
    d.observe([1, 2, 99])  # the answer put 99 in place of 3: the prediction resumes after it
    assert d.propose(3) == [4, 5, 6]
    d.observe([97, 98])  # the answer left the prediction
    assert d.propose(3) == []
    d.observe([5, 6])  # and came back to it
    assert d.propose(3) == [7, 8]


def test_accepts_the_leading_drafts_equal_to_the_draws():
    assert accept_point_draft([4, 5, 6, 7], [4, 5, 9]) == 2
    assert accept_point_draft([1], []) == 0
    assert accept_point_draft([3, 5, 6, 2], [3, 5, 6]) == 3


def test_a_row_that_keeps_missing_pauses_its_drafting():
    config = SpeculationConfig(mode=PROMPT_LOOKUP, min_yield=1.0)
    row = SpecRow(LookupDrafter(PROMPT_LOOKUP, source=None, ngram_min=2, ngram_max=3), config)
    row.record(4, 0)
    assert row.wants_draft()
    row.record(4, 0)  # yield down to 0.5 accepted tokens per drafting step
    paused = [row.wants_draft() for _ in range(10)]
    assert paused[:4] == [False] * 4 and paused[4]
    row.record(4, 0)  # after a pause, one miss pauses again, for longer
    assert [row.wants_draft() for _ in range(9)] == [False] * 8 + [True]
    row.record(6, 6)  # a row that keeps hitting never pauses
    for _ in range(20):
        row.record(6, 5)
        assert row.pause == 0


def test_by_default_a_row_that_never_hits_still_tries_every_few_steps():
    """The defaults pause at most 8 steps, so a copy that starts late is found soon, and a
    row whose drafts always fail drafts on about one step in five (a short, cheap draft)."""
    row = SpecRow(
        LookupDrafter(PROMPT_LOOKUP, source=None, ngram_min=1, ngram_max=4),
        SpeculationConfig(mode=PROMPT_LOOKUP),
    )
    drafting_steps = []
    for step in range(200):
        if row.wants_draft():
            drafting_steps.append(step)
            row.record(row.k, 0)
    gaps = [b - a for a, b in itertools.pairwise(drafting_steps)]
    assert max(gaps) <= 1 + SpeculationConfig().max_pause
    assert 20 <= len(drafting_steps) <= 60
    assert row.k == 1  # what it keeps trying is one token


def test_prompt_lookup_matches_a_single_token_by_default():
    config = SpeculationConfig()
    d = LookupDrafter(
        PROMPT_LOOKUP, source=None, ngram_min=config.ngram_min, ngram_max=config.ngram_max
    )
    d.observe([7, 8, 9, 4, 5])
    d.observe([9])  # only the last token matches earlier text
    assert d.propose(2) == [4, 5]


# -- the acceptance rule -------------------------------------------------------------------

# Six tokens; the draft is token 1, likely but not certain.
P = [0.05, 0.40, 0.25, 0.15, 0.10, 0.05]
CHI2_DF5_P001 = 20.515  # the chi-square quantile at 0.999 for 5 degrees of freedom


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


@pytest.mark.parametrize("seeded", [False, True])
def test_verified_tokens_follow_the_target_distribution(seeded):
    """The first token a verification emits (the draft if accepted, else the correction)
    follows p, and drafts are accepted with probability p(draft): 6000 verifications, a
    chi-square goodness-of-fit test at 99.9 % confidence (a correct rule fails it once in a
    thousand seeds; this seed is fixed), and the acceptance rate within 4.5 standard errors."""
    n = 6000
    logp = mx.log(mx.array([P, P]))  # two positions: the draft's, and the one after it
    draft = [1]
    counts = [0] * len(P)
    accepted = 0
    mx.random.seed(1234)
    for i in range(n):
        sampler = SeededSampler(1.0, 0.0, seed=i) if seeded else make_sampler(temp=1.0)
        row = SpecRow(_null_drafter(), SpeculationConfig(), sampler=sampler)
        draws = row.samples(logp).tolist()
        a = accept_point_draft(draws, draft)
        token = draft[0] if a else draws[0]
        accepted += a
        counts[token] += 1
    assert _chi_square(counts, P) < CHI2_DF5_P001, counts
    se = (P[1] * (1 - P[1]) / n) ** 0.5
    assert abs(accepted / n - P[1]) < 4.5 * se


def test_seeded_draws_are_the_tokens_plain_decoding_draws():
    logits = mx.random.normal((5, VOCAB), key=mx.random.key(3))
    plain = SeededSampler(0.8, 0.9, seed=11)
    expected = [plain(logits[j : j + 1]).item() for j in range(5)]
    spec = SeededSampler(0.8, 0.9, seed=11)
    first = spec.draws(logits[:3]).tolist()
    spec.advance(2)  # two of the three became tokens; the third is drawn again
    second = spec.draws(logits[2:]).tolist()
    assert first[:2] + second == expected


def _null_drafter() -> LookupDrafter:
    return LookupDrafter(PROMPT_LOOKUP, source=None, ngram_min=2, ngram_max=3)


# -- verification in the batch, on a tiny random model --------------------------------------


def _tiny_model() -> nn.Module:
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=3,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        rope_traditional=True,
    )
    model = llama.Model(args)
    # Larger weights make sharper, less repetitive output than the default init.
    model.update(nn.utils.tree_map(lambda w: w * 6 if w.ndim == 2 else w, model.parameters()))
    mx.eval(model.parameters())
    return model


class _OracleDrafter:
    """Proposes the true continuation with some tokens spoiled: each row then accepts a
    different number of drafts per step, which is what the re-alignment must survive."""

    method = "oracle"

    def __init__(self, truth: list[int], prompt_len: int, spoil: float, seed: int) -> None:
        self.truth = truth
        self.prompt_len = prompt_len
        self.seen = 0
        self.rng = random.Random(seed)
        self.spoil = spoil

    def observe(self, tokens: list[int]) -> None:
        self.seen += len(tokens)

    def propose(self, k: int) -> list[int]:
        start = self.seen - self.prompt_len
        out = list(self.truth[start : start + k])
        return [(t + 1) % VOCAB if self.rng.random() < self.spoil else t for t in out]


def _run(gen: BatchGenerator, prompts, max_tokens) -> dict[int, list[int]]:
    uids = gen.insert(prompts, max_tokens=max_tokens)
    out: dict[int, list[int]] = {u: [] for u in uids}
    done: set[int] = set()
    while len(done) < len(uids):
        _, responses = gen.next()
        for r in responses:
            assert r.uid not in done, "a token after the sequence finished"
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                done.add(r.uid)
    return out


@pytest.mark.parametrize("spoil", [0.0, 0.3])
def test_batched_verification_gives_the_tokens_of_plain_decoding(spoil):
    model = _tiny_model()
    checkpoints: list[int] = []
    install_prefill_gates(model, lambda: checkpoints.append(1))
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (7, 19, 12, 4)]
    max_tokens = [40, 33, 40, 25]
    plain = _run(BatchGenerator(model, completion_batch_size=4), prompts, max_tokens)
    truth = list(plain.values())
    prefill_checkpoints = len(checkpoints)
    assert prefill_checkpoints > 0

    config = SpeculationConfig(mode=PROMPT_LOOKUP, num_draft=6, step_budget=32, lookup_max_batch=4)
    gen = SpecBatchGenerator(model, speculation=config, completion_batch_size=4)
    never_pause = SpeculationConfig(num_draft=6, min_yield=0.0)
    rows = []
    for i, (p, t) in enumerate(zip(prompts, truth, strict=True)):
        if i == 3:
            continue  # one row never drafts and shares the steps of the others
        rows.append(SpecRow(_OracleDrafter(t, len(p), spoil, seed=i), never_pause))
    uids = gen.insert(prompts, max_tokens=max_tokens)
    for uid, row in zip(uids, rows, strict=False):
        gen.attach(uid, row)
    out: dict[int, list[int]] = {u: [] for u in uids}
    done: set[int] = set()
    while len(done) < len(uids):
        _, responses = gen.next()
        for r in responses:
            assert r.uid not in done
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                done.add(r.uid)
                # The KV cache handed back holds exactly the sequence's tokens.
                assert r.prompt_cache[0].offset == len(r.all_tokens)
    assert list(out.values()) == truth
    assert [len(t) for t in out.values()] == max_tokens  # never past max_tokens
    (method, proposed, accepted) = gen.counts()[0]
    assert method == "oracle" and accepted > 0
    if spoil:
        assert accepted < proposed  # rows did reject, and so were re-aligned
    # The same prefill, and verification passes never stop at the prefill gates.
    assert len(checkpoints) == 2 * prefill_checkpoints


# -- the draft model's drafter -----------------------------------------------------------------


def _greedy(model: nn.Module, tokens: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``tokens``, from a fresh cache: what drafts should be."""
    drafter = ModelDrafter(model, chunk=10_000)
    drafter.observe(tokens[:-1])
    return drafter.propose_after(tokens[-1], n)


def test_the_draft_model_reads_the_prompt_in_chunks_then_drafts_greedily():
    model = _tiny_model()
    prompt = [random.Random(1).randrange(VOCAB) for _ in range(11)]
    drafter = ModelDrafter(model, chunk=4)
    drafter.observe(prompt)
    pending = 5
    assert drafter.propose_after(pending, 4) == []  # 12 tokens to read, 4 per call
    assert drafter.propose_after(pending, 4) == []
    drafts = drafter.propose_after(pending, 4)
    assert drafts == _greedy(model, [*prompt, pending], 4)


def test_the_draft_model_forgets_rejected_drafts():
    """After a verification that took two drafts and then drew another token, the next
    drafts are those of a fresh draft cache over the sequence as it now stands."""
    model = _tiny_model()
    prompt = [random.Random(2).randrange(VOCAB) for _ in range(8)]
    drafter = ModelDrafter(model, chunk=100)
    drafter.observe(prompt)
    first = drafter.propose_after(7, 5)
    assert len(first) == 5
    other = (first[2] + 1) % VOCAB  # the model drew something else than the third draft
    drafter.observe([7, *first[:2]])
    again = drafter.propose_after(other, 5)
    assert again == _greedy(model, [*prompt, 7, *first[:2], other], 5)


def test_draft_tokens_beyond_the_models_vocabulary_are_cut():
    model = _tiny_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    full = _greedy(model, prompt, 6)
    # A "vocabulary size" that the largest draft does not fit under: the drafts end before
    # its first occurrence, which the verifying model never sees.
    k = full.index(max(full))
    drafter = ModelDrafter(model, chunk=100, vocab_size=max(full))
    drafter.observe(prompt[:-1])
    assert drafter.propose_after(prompt[-1], 6) == full[:k]
