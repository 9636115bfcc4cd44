"""The request lifecycle table: every edge either allowed or refused, resources derived."""

from __future__ import annotations

import itertools

import pytest

from trioserve.engine.request_state import (
    TRANSITIONS,
    IllegalTransition,
    Lifecycle,
    RequestState,
)

S = RequestState
ENDS = {S.FINISHED, S.FAILED, S.CANCELLED}


def _at(state: RequestState) -> Lifecycle:
    path = {
        S.QUEUED: [],
        S.ADMITTED: [S.ADMITTED],
        S.PREFILL: [S.ADMITTED, S.PREFILL],
        S.DECODE: [S.ADMITTED, S.PREFILL, S.DECODE],
        S.FINISHED: [S.ADMITTED, S.DECODE, S.FINISHED],
        S.FAILED: [S.FAILED],
        S.CANCELLED: [S.CANCELLED],
    }[state]
    lifecycle = Lifecycle()
    for step in path:
        lifecycle.advance(step)
    return lifecycle


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)))
def test_every_edge_is_allowed_exactly_when_the_table_has_it(old, new):
    lifecycle = _at(old)
    if new in TRANSITIONS[old]:
        assert lifecycle.advance(new) is old
        assert lifecycle.state is new
    else:
        with pytest.raises(IllegalTransition):
            lifecycle.advance(new)
        assert lifecycle.state is old


def test_the_ends_are_final_and_every_live_state_can_end():
    for end in ENDS:
        assert TRANSITIONS[end] == frozenset()
    for state in set(S) - ENDS:
        assert {S.FAILED, S.CANCELLED} <= TRANSITIONS[state]
    assert S.FINISHED not in TRANSITIONS[S.QUEUED]  # no answer without a slot


def test_a_slot_is_held_exactly_from_admission_to_the_end():
    assert [s for s in S if _at(s).holds_slot] == [S.ADMITTED, S.PREFILL, S.DECODE]
    assert all(_at(s).ended == (s in ENDS) for s in S)
    assert all(_at(s).in_worker == _at(s).holds_slot for s in S)
