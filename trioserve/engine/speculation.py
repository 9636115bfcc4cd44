"""Speculative decoding inside the continuous batch, with exact results.

Theory of operation
-------------------
A sequence may come with a *drafter*: prompt lookup (the continuation of the latest earlier
occurrence of its last few tokens, in the prompt or in what it has generated) or a request's
predicted output (OpenAI's ``prediction``). Both are deterministic: a draft is a guess of the
next tokens, no distribution of its own.

mlx-lm's ``GenerationBatch`` runs one step ahead: after ``next()`` the token sampled last
(``_next_tokens``, "pending") is known but not yet in the KV cache. A speculative step feeds
every row ``W`` positions, ``[pending, d1 .. dk, filler...]`` (rows without a draft get fillers),
in one forward pass of the whole batch. For row ``i`` the model's output at position ``j`` is
the distribution of the token after ``pending, d1..dj``; ``sample(j)`` is the token the
sequence would have drawn there without speculation (greedy: the argmax; sampled: the row's own
sampler with the key it would have used). Draft ``d(j+1)`` is accepted while it equals
``sample(j)``; the first sample that differs (or the one after the last draft) becomes the new
pending token. For a point-mass draft this *is* the standard rejection rule (accept ``d`` with
probability ``p(d)``; otherwise the token comes from ``p`` with ``d`` removed and
renormalised), and because the draws are the ones plain decoding would make, a seeded request
gives the same tokens with speculation as without (up to batch numerics).

Every row of a ``BatchKVCache`` shares one write index. Row ``i`` keeps ``r_i = 1 + a_i``
positions (``a_i`` accepted drafts, fewer where a stop or ``max_tokens`` ends it); the cache
is trimmed to ``K = max r_i`` new positions, and each row that kept fewer is rolled right by
``K - r_i`` so its rejected positions move into its left padding (masked, as mlx-lm masks
padding; its RoPE offset counts real tokens only). mlx-lm's own ``filter``/``extend``/
``extract`` keep working on that layout.

Sequences with logits processors (penalties, a grammar's mask) never draft: their processors
would have to see each draft position's context. They still share the step (position 0).

Adaptive: a drafter whose drafts are rejected outright several times in a row pauses, for
longer each time; the draft length follows the acceptance; and the positions one step may
verify are capped for the whole batch (``step_budget``), so many streams draft little.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import BatchKVCache, dynamic_roll

from trioserve.engine.draft_model import DRAFT_MODEL, DraftModel
from trioserve.engine.prefill_gate import passthrough

log = logging.getLogger(__name__)

MODES = ("off", "prompt-lookup", "draft-model")
PROMPT_LOOKUP = "prompt-lookup"
PREDICTION = "prediction"


@dataclass(frozen=True)
class SpeculationConfig:
    """Server-wide settings (``--speculation`` and friends)."""

    mode: str = "off"  # the default for requests that do not say: off | prompt-lookup
    num_draft: int = 10  # most draft tokens one sequence proposes per step
    ngram_max: int = 4  # longest suffix looked up
    # Shortest suffix prompt lookup looks up. One token misfires more often, but a miss costs
    # little (a rejected draft shrinks the next to one token), and it finds a copy at once.
    ngram_min: int = 1
    prediction_ngram_min: int = 2  # the same, to find the place in a prediction again
    step_budget: int = 16  # most positions (rows x width) one speculative step computes
    # Prompt lookup drafts only while at most this many sequences decode: with more, a step
    # that drafts for some costs all of them (measured: plain chat at 8 streams, 0.70x).
    # Predictions draft at any batch size.
    lookup_max_batch: int = 2
    # Accepted tokens per drafting step (smoothed) below which a sequence pauses drafting. On
    # this CPU a plain step costs ~130 ms and a one-token draft adds ~27: one accepted token
    # in five pays for it.
    min_yield: float = 0.2
    # The longest pause, in steps (pauses double from 4): short, so a copy that starts after
    # a stretch of new text is not missed. Chosen by replaying recorded greedy outputs (edit
    # and chat) through these drafters: tools/replay_speculation.py.
    max_pause: int = 8
    # False: nothing drafts, predictions included. Distributed serving (mlx.launch) sets it:
    # every rank must run the same model calls, and the ranks do not share drafts yet.
    allowed: bool = True
    # ``--draft-model``: called once on the MLX thread, returns (model, tokenizer); None: no
    # draft model, and the draft-model mode is refused where a request asks for it.
    load_draft: Callable[[], tuple[Any, Any]] | None = field(default=None, compare=False)
    draft_prefill_chunk: int = 128  # prompt tokens the draft model reads per step, catching up


# -- drafters ----------------------------------------------------------------------------


class LookupDrafter:
    """Proposes the continuation of an earlier occurrence of the sequence's last tokens.

    ``source`` is what continuations are read from: for prompt lookup the sequence itself
    (prompt plus generated, growing), for a prediction the predicted tokens (fixed). An index
    maps each n-gram of the source to the position after its latest occurrence. Once a match
    is found the drafter follows it (``ptr``) as long as the output keeps agreeing, so a long
    copy is proposed in one piece without searching again.
    """

    def __init__(
        self,
        method: str,
        *,
        source: Sequence[int] | None,
        ngram_min: int,
        ngram_max: int,
        start_ptr: int | None = None,
    ) -> None:
        self.method = method
        self._self_source = source is None  # prompt lookup reads from the history itself
        self._source: list[int] = [] if source is None else list(source)
        self._nmin = max(1, ngram_min)
        self._nmax = max(self._nmin, ngram_max)
        self._index: dict[tuple[int, ...], int] = {}
        self._history: list[int] = []
        self.ptr: int | None = start_ptr
        self._resume: int | None = None  # where a followed match resumes past one miss
        if not self._self_source:
            self._index_all(self._source)

    def _index_all(self, tokens: list[int]) -> None:
        for end in range(1, len(tokens)):
            self._index_at(tokens, end)

    def _index_at(self, tokens: list[int], end: int) -> None:
        """tokens[end] exists: every n-gram ending at end - 1 continues there."""
        for n in range(self._nmin, self._nmax + 1):
            if end - n < 0:
                break
            self._index[tuple(tokens[end - n : end])] = end

    def observe(self, tokens: Sequence[int]) -> None:
        """Tokens now part of the sequence, in order."""
        for t in tokens:
            resume = None
            if self.ptr is not None:
                if self.ptr < len(self._source) and self._source[self.ptr] == t:
                    self.ptr += 1
                else:
                    # Where no n-gram matches, the token may have replaced the source's
                    # (a renamed name, an edited number): the text after it is the guess.
                    resume, self.ptr = self.ptr + 1, None
            self._resume = resume
            self._history.append(t)
            if self._self_source:
                self._source.append(t)
                self._index_at(self._source, len(self._source) - 1)

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        if self.ptr is None or self.ptr >= len(self._source):
            self.ptr = self._search()
            if self.ptr is None and self._resume is not None:
                self.ptr = self._resume if self._resume < len(self._source) else None
            self._resume = None
        if self.ptr is None:
            return []
        return self._source[self.ptr : self.ptr + k]

    def _search(self) -> int | None:
        h = self._history
        for n in range(self._nmax, self._nmin - 1, -1):
            if len(h) < n:
                continue
            at = self._index.get(tuple(h[-n:]))
            if at is not None and at < len(self._source):
                return at
        return None


class ChainDrafter:
    """Several drafters, asked in order: the first with a proposal gives the draft. A
    prediction goes first; where the answer has left it (say it kept a name the prediction
    changed), prompt lookup finds the text in the prompt. ``last_method`` names the source
    of the latest proposal."""

    def __init__(self, method: str, drafters: Sequence[Any]) -> None:
        self.method = method
        self.last_method = method
        self._drafters = list(drafters)

    def observe(self, tokens: Sequence[int]) -> None:
        for d in self._drafters:
            d.observe(tokens)

    def propose(self, k: int) -> list[int]:
        for d in self._drafters:
            out = d.propose(k)
            if out:
                self.last_method = d.method
                return out
        return []


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    steps: int = 0


class SpecRow:
    """One sequence's drafting state: its drafter, its sampler's verification, its counts.

    Made by the worker before the sequence enters the batch; read by the worker for usage.
    """

    def __init__(
        self,
        drafter: LookupDrafter,
        config: SpeculationConfig,
        *,
        sampler: Any = None,
        fault: Any = None,
        prompt_len: int = 0,
        observe_prompt: bool = True,
    ) -> None:
        self.drafter = drafter
        self.method = drafter.method
        self.config = config
        self.sampler = sampler  # None: greedy; else the row's raw sampler (see verify)
        self.fault = fault  # the worker's _FaultBox: an error here fails this sequence only
        self.stats = SpecStats()  # all its drafts
        self.by_method: dict[str, SpecStats] = {}  # by where the drafts came from
        self.seen = 0 if observe_prompt else prompt_len  # tokens of the row fed to drafter
        # A prediction is a strong guess; prompt lookup starts short (a miss costs less).
        self.k = config.num_draft if drafter.method == PREDICTION else min(3, config.num_draft)
        self.yield_ema = 2.0  # accepted tokens per drafting step, smoothed (optimistic start)
        self.empty = 0  # steps in a row that wanted a draft and found none
        self.pause = 0  # steps left without drafting
        self.next_pause = 4

    def wants_draft(self) -> bool:
        if self.pause > 0:
            self.pause -= 1
            return False
        return self.fault is None or self.fault.error is None

    def catch_up(self, kv_tokens: Sequence[int]) -> None:
        """Feed the drafter the row's tokens it has not seen (those in the KV cache)."""
        if self.seen < len(kv_tokens):
            self.drafter.observe(kv_tokens[self.seen :])
            self.seen = len(kv_tokens)

    @property
    def needs_pending(self) -> bool:
        return getattr(self.drafter, "needs_pending", False)

    def draft(self, limit: int, pending: int | None = None) -> list[int]:
        """Up to ``limit`` tokens to follow the pending token, ``pending`` where it is known.

        A draft model is given it (``needs_pending``). A lookup drafter that is given it sees
        it as the sequence's next token (it is: every step feeds the pending token first),
        so after a rejected draft it looks for the text that follows the model's own choice.
        Where the pending token is still being computed (after a plain, pipelined step) a
        lookup drafter proposes one token more, its guess of the pending one, and that one
        is dropped (a wrong guess only costs acceptance: every draft is verified)."""
        if limit <= 0:
            return []
        k = min(self.k, limit)
        if pending is None:
            return self.drafter.propose(k + 1)[1:]
        if self.needs_pending:
            return self.drafter.propose_after(pending, k)
        self.drafter.observe([pending])
        self.seen += 1  # the next catch_up starts after it
        return self.drafter.propose(k)

    @property
    def last_method(self) -> str:
        """Where the latest draft came from (a chain of drafters has several sources)."""
        return getattr(self.drafter, "last_method", self.method)

    def record(self, proposed: int, accepted: int) -> None:
        """After a verification: adapt the draft length, and pause while drafting yields
        less than ``min_yield`` accepted tokens per step (a drafting step costs more than a
        plain one: it waits for the step before it, and computes more positions)."""
        if proposed <= 0:
            return
        self.empty = 0
        for stats in (self.stats, self.by_method.setdefault(self.last_method, SpecStats())):
            stats.proposed += proposed
            stats.accepted += accepted
            stats.steps += 1
        self.yield_ema = 0.5 * self.yield_ema + 0.5 * accepted
        if accepted == proposed:
            self.k = min(self.config.num_draft, self.k * 2)
        elif accepted:
            self.k = max(2, min(self.config.num_draft, accepted + 2))
        else:
            self.k = max(1, self.k // 2)
        if self.yield_ema < self.config.min_yield:
            self._pause()
        elif accepted >= 2:  # paying off: the next pause starts short again
            self.next_pause = 4

    def _pause(self) -> None:
        self.pause = self.next_pause
        self.next_pause = min(self.next_pause * 2, self.config.max_pause)
        self.yield_ema = self.config.min_yield + 0.5  # after the pause: a fresh chance
        self.empty = 0

    def samples(self, logprobs: mx.array) -> mx.array:
        """The token this sequence draws at each of ``logprobs``' positions ([n, V] -> [n]):
        exactly what plain decoding would draw at each, had it reached it."""
        sampler = self.sampler
        if sampler is None:
            return mx.argmax(logprobs, axis=-1)
        draws = getattr(sampler, "draws", None)
        try:
            if draws is not None:  # a seeded sampler: one key per position, in order
                return draws(logprobs)
            return sampler(logprobs).reshape(-1)  # stateless: rows are independent draws
        except Exception as exc:
            if self.fault is not None and self.fault.error is None:
                self.fault.error = exc
            return mx.argmax(logprobs, axis=-1)

    def commit(self, used: int) -> None:
        """``used`` positions' draws became tokens: a seeded sampler advances that far."""
        advance = getattr(self.sampler, "advance", None)
        if advance is not None:
            advance(used)


def accept_point_draft(draws: Sequence[int], draft: Sequence[int]) -> int:
    """How many draft tokens are accepted: the leading ones equal to the draws made after
    the tokens before them (``draws[j]`` follows ``draft[:j]``)."""
    a = 0
    for d, z in zip(draft, draws, strict=False):
        if d != z:
            break
        a += 1
    return a


def make_spec_row(
    req: Any,
    config: SpeculationConfig,
    *,
    sampler: Any,
    fault: Any,
    has_processors: bool,
    draft_model: DraftModel | None = None,
) -> SpecRow | None:
    """The drafting state for one request, or None where it does not draft.

    A request drafts from its ``prediction`` whenever it has one, else by prompt lookup or
    with the draft model where its ``speculation`` (or the server's default) says so.
    Sequences with logits processors never draft (see the module docstring).
    """
    if has_processors or not config.allowed:
        return None
    prediction = getattr(req, "prediction_tokens", None)
    mode = getattr(req, "speculation", None) or config.mode
    if prediction:
        from_prediction = LookupDrafter(
            PREDICTION,
            source=prediction,
            ngram_min=config.prediction_ngram_min,
            ngram_max=config.ngram_max,
            start_ptr=0,
        )
        # The prompt (and the answer so far) as the fallback source; it is given the prompt
        # here, as the prediction must not see it (it starts at the answer's first token).
        from_prompt = LookupDrafter(
            PROMPT_LOOKUP, source=None, ngram_min=config.ngram_min, ngram_max=config.ngram_max
        )
        from_prompt.observe(req.prompt_tokens)
        drafter = ChainDrafter(PREDICTION, [from_prediction, from_prompt])
        return SpecRow(
            drafter,
            config,
            sampler=sampler,
            fault=fault,
            prompt_len=len(req.prompt_tokens),
            observe_prompt=False,
        )
    if mode == PROMPT_LOOKUP:
        drafter = LookupDrafter(
            PROMPT_LOOKUP, source=None, ngram_min=config.ngram_min, ngram_max=config.ngram_max
        )
        return SpecRow(drafter, config, sampler=sampler, fault=fault)
    if mode == DRAFT_MODEL and draft_model is not None:
        drafter = draft_model.drafter(config.draft_prefill_chunk)
        return SpecRow(drafter, config, sampler=sampler, fault=fault)
    return None


# -- the batch ----------------------------------------------------------------------------


_NO_PENDING: Mapping[int, int] = MappingProxyType({})


class SpecGenerationBatch(GenerationBatch):
    """mlx-lm's generation batch, with a speculative step when some row has a draft."""

    spec: SpecBatchGenerator | None = None  # set by the generator that owns this batch
    _known_pending: Mapping[int, int] = _NO_PENDING

    def next(self) -> list[Any]:
        owner = self.spec
        # Pending tokens the last speculative step chose on the host, by uid; any step
        # (this one) makes them stale.
        known, self._known_pending = self._known_pending, _NO_PENDING
        if not self.uids or owner is None or not owner.rows:
            return super().next()
        rows = [owner.rows.get(uid) for uid in self.uids]
        lookup_ok = len(self.uids) <= owner.config.lookup_max_batch
        wanting = [
            i
            for i, r in enumerate(rows)
            if r is not None and (lookup_ok or r.method == PREDICTION) and r.wants_draft()
        ]
        if not wanting or not _trimmable(self.prompt_cache):
            return super().next()
        width_cap = owner.config.step_budget // len(self.uids)
        if width_cap < 2:
            return super().next()
        # After a plain step the pending token is still being computed: lookup drafts come
        # from the tokens before it (see SpecRow.draft), so nothing waits here and a step
        # without drafts keeps mlx-lm's pipelining. After a speculative step it is known.
        drafts: list[list[int]] = [[] for _ in self.uids]
        # A draft model is told the pending token, so it waits for this step's last one;
        # its own forward passes would queue behind it on the same stream anyway.
        pending = (
            self._next_tokens.tolist() if any(rows[i].needs_pending for i in wanting) else None
        )
        for i in wanting:
            row = rows[i]
            try:
                row.catch_up(self.tokens[i])
                # Never past max_tokens: pending is one token, each accepted draft another.
                room = self.max_tokens[i] - self._num_tokens[i] - 1
                after = pending[i] if pending is not None else known.get(self.uids[i])
                drafts[i] = row.draft(min(width_cap - 1, room), after)
            except Exception as exc:  # a drafter's bug costs its sequence, not the batch
                drafts[i] = []
                if row.fault is not None and row.fault.error is None:
                    row.fault.error = exc
        if not any(drafts):
            return super().next()
        return self._speculative_next(rows, drafts)

    def _speculative_next(self, rows: list[SpecRow | None], drafts: list[list[int]]) -> list[Any]:
        owner = self.spec
        n_rows = len(self.uids)
        width = 1 + max(len(d) for d in drafts)
        # Rows with shorter drafts are filled with token 0: positions computed and then
        # dropped with the rejected ones.
        current = self._next_tokens.reshape(-1, 1).astype(mx.int32)
        filled = mx.array([d + [0] * (width - 1 - len(d)) for d in drafts], dtype=mx.int32)
        pending_logprobs = self._next_logprobs
        with passthrough():
            logits = self.model(mx.concatenate([current, filled], axis=1), cache=self.prompt_cache)

        # Rows with logits processors use position 0 only, processed as mlx-lm does.
        first = logits[:, 0, :]
        token_context = []
        if any(self.logits_processors):
            processed = []
            current = current.reshape(-1)
            for e in range(n_rows):
                sample_logits = first[e : e + 1]
                processors = self.logits_processors[e] or ()
                if processors:
                    context = self._token_context[e].update_and_fetch(current[e : e + 1])
                    token_context.append(context)
                    for processor in processors:
                        sample_logits = processor(context, sample_logits)
                processed.append(sample_logits)
            first = mx.concatenate(processed, axis=0)
        first_lp = _log_softmax(first)

        # Draws: drafting rows at every position they verify, others at position 0. A
        # greedy row needs no normalisation (MLX's CPU exp is slow: V per position), and the
        # logprobs of the tokens it emits stay lazy: evaluated only where a request asks.
        draws: list[mx.array] = []
        for i, d in enumerate(drafts):
            if d:
                span = logits[i, : len(d) + 1]
                row = rows[i]
                if row.sampler is None:
                    draws.append(mx.argmax(span, axis=-1))
                else:
                    draws.append(row.samples(_log_softmax(span)))
            else:
                sampler = (self.samplers[i] if self.samplers else None) or self.fallback_sampler
                draws.append(sampler(first_lp[i : i + 1]).reshape(-1))
        mx.eval(draws, token_context, current)
        draws_host = [z.tolist() for z in draws]
        pending = current.reshape(-1).tolist()

        responses: list[Any] = []
        keep: list[int] = []
        kept: list[int] = []
        new_pending: list[int] = []
        new_pending_lp: list[mx.array] = []
        for i in range(n_rows):
            d = drafts[i]
            z = draws_host[i]
            a = accept_point_draft(z, d) if d else 0
            emitted = [pending[i], *d[:a]]
            lps = [pending_logprobs[i]] + [_log_softmax(logits[i, j]) for j in range(a)]
            finish = None
            used = len(emitted)
            for j, t in enumerate(emitted):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(t):
                    finish = "stop"
                if finish is not None:
                    used = j + 1
                    break
            emitted, lps = emitted[:used], lps[:used]
            row = rows[i]
            if d and row is not None:
                accepted = used - 1
                row.record(len(d), accepted)
                row.commit(used)
                owner.count(row.last_method, len(d), accepted)
            kept.append(used)
            self.tokens[i].extend(emitted)
            new_pending.append(z[a] if d else z[0])
            new_pending_lp.append(_log_softmax(logits[i, a]) if d else first_lp[i])
            for j, (t, lp) in enumerate(zip(emitted, lps, strict=True)):
                last = j == len(emitted) - 1
                responses.append((i, t, lp, finish if last else None))
            if finish is None:
                keep.append(i)

        self._realign(width, kept)
        self._next_tokens = mx.array(new_pending)
        self._next_logprobs = new_pending_lp
        self._known_pending = {self.uids[i]: new_pending[i] for i in keep}

        out = []
        for i, t, lp, finish in responses:
            out.append(
                self.Response(
                    uid=self.uids[i],
                    token=t,
                    logprobs=lp,
                    finish_reason=finish,
                    prompt_cache=self.extract_cache(i) if finish else None,
                    all_tokens=self.tokens[i] if finish else None,
                )
            )
        if len(keep) < n_rows:
            for i in range(n_rows):
                if i not in keep:
                    owner.rows.pop(self.uids[i], None)
            self.filter(keep)
        return out

    def _realign(self, width: int, kept: list[int]) -> None:
        """Every row wrote ``width`` positions and keeps ``kept[i]`` of them: trim to the
        most kept, and roll the rows that kept fewer so their extra positions become left
        padding."""
        most = max(kept)
        shifts = [most - k for k in kept]
        shift = mx.array(shifts) if any(shifts) else None
        for c in self.prompt_cache:
            if width > most:
                c.trim(width - most)
            if shift is None:
                continue
            idx = c._idx
            c.keys[..., :idx, :] = dynamic_roll(c.keys[..., :idx, :], shift[:, None], axis=2)
            c.values[..., :idx, :] = dynamic_roll(c.values[..., :idx, :], shift[:, None], axis=2)
            c.left_padding = c.left_padding + shift
            c.offset = c.offset - shift


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _trimmable(caches: list[Any]) -> bool:
    return bool(caches) and all(type(c) is BatchKVCache for c in caches)


class SpecBatchGenerator(BatchGenerator):
    """mlx-lm's ``BatchGenerator`` whose generation batch can speculate.

    ``attach(uid, row)`` gives a sequence its drafting state; sequences without one decode as
    usual and share the speculative steps of the others.
    """

    def __init__(
        self,
        model: Any,
        *,
        speculation: SpeculationConfig,
        totals: dict[str, SpecStats] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.config = speculation
        self.rows: dict[int, SpecRow] = {}
        # Shared with the worker, so a fresh batch after a failure keeps counting.
        self.totals: dict[str, SpecStats] = {} if totals is None else totals
        batch = SpecGenerationBatch.empty(self.model, self.sampler)
        batch.spec = self
        self._generation_batch = batch

    def attach(self, uid: int, row: SpecRow) -> None:
        self.rows[uid] = row

    def remove(self, uids: Any, return_prompt_caches: bool = False) -> Any:
        for uid in uids:
            self.rows.pop(uid, None)
        return super().remove(uids, return_prompt_caches=return_prompt_caches)

    def count(self, method: str, proposed: int, accepted: int) -> None:
        stats = self.totals.setdefault(method, SpecStats())
        stats.proposed += proposed
        stats.accepted += accepted
        stats.steps += 1

    def counts(self) -> tuple[tuple[str, int, int], ...]:
        """(method, proposed, accepted) draft tokens since this generator started."""
        return tuple((m, s.proposed, s.accepted) for m, s in sorted(self.totals.items()))
