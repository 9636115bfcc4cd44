"""What rank 0 tells the other ranks before each step: one round.

A round is a header of small ints (flags, the previous step's token digest) and, when rank 0
changed the batch since the last round, the operations it applied, pickled: every rank runs
the same code, so the requests travel as they are (a compiled grammar as its text).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from trioserve.engine.constraints import Constraint
from trioserve.engine.params import GenerationRequest

STEP = 1  # the ranks run one step of the batch after this round
STOP = 2  # the ranks end: rank 0 is shutting down

DIGEST_MODULUS = 1 << 30  # the digest travels in an int32 all_sum


@dataclass(frozen=True)
class Insert:
    request: GenerationRequest
    cached: int  # prompt tokens rank 0 took from its prefix cache: the others must match


@dataclass(frozen=True)
class Remove:
    uid: int
    keep_cache: bool


Op = Insert | Remove


def encode(ops: list[Op]) -> bytes:
    return pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL) if ops else b""


def decode(payload: bytes) -> list[Op]:
    # Only rank 0 of the same launch writes these (the ring's peers are our own processes).
    return pickle.loads(payload) if payload else []  # noqa: S301


def portable(request: GenerationRequest) -> GenerationRequest:
    """The request as another rank can rebuild it: a compiled grammar (llguidance objects do
    not pickle) goes as its grammar text, compiled again there."""
    constraint: Any = request.constraint
    if constraint is None:
        return request
    bare = getattr(constraint, "constraint", constraint)  # a GrammarProcessor keeps its own
    text = bare.grammar()
    return replace(request, constraint=Constraint(label=bare.label, make=partial(str, text)))


def digest(generation_responses: list[Any]) -> int:
    """A cheap fingerprint of one step's tokens, the same on every rank in step."""
    total = 0
    for r in generation_responses:
        total = (total * 31 + r.uid * 1_000_003 + r.token) % DIGEST_MODULUS
    return total
