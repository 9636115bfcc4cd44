"""The MLX worker: the one thread that owns the model and the batch.

Theory of operation
-------------------
MLX streams are bound to the OS thread that made them, and a thread cannot be cancelled from
Trio. So one long-lived thread (started by a single ``trio.to_thread.run_sync`` call from
``Engine.run``) loads the model, builds mlx-lm's ``BatchGenerator`` and drives it for its whole
life. Nothing else touches MLX state.

Trio talks to it through a thread-safe command queue: ``Submit``, ``Cancel`` and ``Stop``.
Commands are drained before every step, so a cancelled sequence is removed from the batch
before the next step runs, and commands keep their order (a cancel is always seen after its
submit, a slot's old sequence is gone before its new one enters).

Results go back with ``TrioToken.run_sync_soon``, once per step: the worker never waits for
the Trio loop, and the Trio side keeps the only references to request channels.

Failure domains
---------------
One sequence's fault fails that request only. Its logits processors and sampler run inside
``BatchGenerator.next()`` wrapped in a guard that records the exception and leaves the logits
alone; after the step the worker fails and drops that sequence. Everything done per sequence
after a step (detokenizer, stop strings, logprobs, removal) runs under its own ``try``. A step
that raises (the model itself) fails the whole batch and starts a fresh one. Anything that
still escapes ends the thread with ``WorkerCrashed`` (native panics included, which derive
from ``BaseException``), and the Trio side fails every outstanding request with its cause.
"""

from __future__ import annotations

import gc
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import trio
from mlx_lm.generate import BatchGenerator

from trioserve.blas import thread_setter
from trioserve.engine.blas_threads import BlasThreads
from trioserve.engine.constraints import make_constraint_processor
from trioserve.engine.cpu_kernels import install_cpu_kernels
from trioserve.engine.draft_model import DraftModel, load_draft_model
from trioserve.engine.events import (
    Event,
    Failed,
    Finished,
    PrefillProgress,
    TokenDelta,
    TopLogprob,
    Usage,
)
from trioserve.engine.memory import keep_freed_heap, release_free_heap
from trioserve.engine.params import GenerationRequest
from trioserve.engine.prefill_gate import PrefillCancelled, install_prefill_gates
from trioserve.engine.prefix_cache import PrefixCache
from trioserve.engine.sampling import make_request_processors, make_request_sampler
from trioserve.engine.speculation import SpecBatchGenerator, SpeculationConfig, make_spec_row
from trioserve.engine.text import StopStringFilter
from trioserve.engine.token_text import streaming_detokenizer, token_piece

log = logging.getLogger(__name__)


class Ticket:
    """Identity of one submitted request, shared by both sides (compared by identity)."""

    __slots__ = ("request",)

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request


class WorkerCrashed(Exception):
    """The worker thread ended on an error that was not an ``Exception`` (e.g. a native
    panic from tokenizers or llguidance); the original is the ``__cause__``."""


@dataclass(frozen=True)
class Submit:
    ticket: Ticket


@dataclass(frozen=True)
class Cancel:
    ticket: Ticket


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the worker holds after its latest step; read by health checks and tests."""

    in_batch: int = 0  # sequences inside mlx-lm's BatchGenerator (queued, prefill, decode)
    tracked: int = 0  # sequences the worker is producing events for
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    failures: int = 0
    prefill_cuts: int = 0  # prefill chunks cut short between layers by a cancel
    prefix_cache_bytes: int = 0
    # Tokens whose keys and values the batch's KV caches hold, summed over its sequences
    # (queued ones hold their prefix-cache hit); the prefix cache's own entries not included.
    kv_tokens: int = 0
    idle: bool = False  # nothing to compute, and the memory it used is handed back
    # Speculative decoding, per draft method: (method, draft tokens proposed, accepted).
    speculation: tuple[tuple[str, int, int], ...] = ()
    # OpenBLAS threads per matmul now, and how often ``--blas-threads auto`` changed it;
    # 0: the count was not set by the engine (OPENBLAS_NUM_THREADS as the process started).
    blas_threads: int = 0
    blas_thread_changes: int = 0


# Called on the Trio thread with the step's events and the state after the step.
Deliver = Callable[[list[tuple[Ticket, Event]], WorkerSnapshot], None]


class _FaultBox:
    """Where a sequence's guarded processors and sampler leave the first error they raise."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None


@dataclass
class _Sequence:
    ticket: Ticket
    uid: int
    detokenizer: Any
    stops: StopStringFilter
    prompt_len: int
    fault: _FaultBox = field(default_factory=_FaultBox)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    generated: int = 0
    ended: bool = False  # Finished was emitted: no second terminal event
    spec: Any = None  # its drafting state (engine/speculation.py), where it drafts


@dataclass
class WorkerConfig:
    parallel: int
    prefill_step_size: int  # while other sequences decode
    solo_prefill_step_size: int = 0  # when none does; 0: the same as prefill_step_size
    prefix_cache_bytes: int = 0  # 0 turns prefix reuse off
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    load: Callable[[], tuple[Any, Any]] = field(default=lambda: (None, None))
    blas_threads: int | str | None = None  # engine/blas_threads.py; None: leave it alone


class Worker:
    """Runs on the MLX thread. Create it anywhere; call ``run`` on the worker thread only."""

    def __init__(self, config: WorkerConfig, schedule: Callable[..., None]) -> None:
        self._config = config
        # ``schedule(fn, *args)`` runs fn on the Trio thread (TrioToken.run_sync_soon).
        self._schedule = schedule
        self.commands: queue.SimpleQueue[Submit | Cancel | Stop] = queue.SimpleQueue()
        # Commands taken during a step (at a prefill checkpoint), served before the queue.
        self._deferred: deque[Submit | Cancel | Stop] = deque()
        self._seqs: dict[int, _Sequence] = {}
        self._by_ticket: dict[Ticket, _Sequence] = {}
        self._snapshot = WorkerSnapshot()
        self._tokenizer: Any = None
        self._model: Any = None
        self._draft_model: DraftModel | None = None  # --draft-model, where one is given
        self._gen: BatchGenerator | None = None
        self._prefix = PrefixCache(config.prefix_cache_bytes)
        self._draft_totals: dict[str, Any] = {}  # draft counts, kept across fresh batches
        self._blas: BlasThreads | None = None  # set on the thread, once the model is loaded

    # -- thread entry -------------------------------------------------------------------

    async def run_async(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None:
        """Run the worker on one thread of its own until ``Stop``: the engine's entry point
        (a fake worker for tests implements the same method as a Trio task)."""
        # Its own limiter, so other to_thread users can never keep it from starting; not
        # abandoned on cancel: Engine.run sends Stop and waits for the thread to end.
        await trio.to_thread.run_sync(self.run, on_ready, deliver, limiter=trio.CapacityLimiter(1))

    def run(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None:
        """Load the model, then serve commands until ``Stop``. Blocks the calling thread.

        Raises what ended it; a ``BaseException`` that is not an ``Exception`` (a pyo3 panic)
        comes out as ``WorkerCrashed`` so the Trio side can report it like any error.
        """
        try:
            self._run(on_ready, deliver)
        except Exception:
            raise
        except BaseException as exc:
            raise WorkerCrashed(f"{type(exc).__name__}: {exc}") from exc

    def _run(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None:
        keep_freed_heap()
        self._model, self._tokenizer = self._config.load()
        install_cpu_kernels(self._model)
        install_prefill_gates(self._model, self._prefill_checkpoint)
        self._load_draft_model()
        self._after_load()
        self._gen = self._new_generator()
        self._blas = _blas_threads(self._config.blas_threads)
        self._warm_up()
        self._schedule(on_ready, self._tokenizer)
        try:
            while self._serve_once(deliver):
                pass
        finally:
            # The Trio side fails every outstanding request once this thread has ended
            # (Engine.run), whether it was in the batch, deferred or still in the queue.
            self._seqs.clear()
            self._by_ticket.clear()
            self._gen.close()
            self._release_model()

    def _release_model(self) -> None:
        """Give the weights, the KV caches and MLX's buffer cache back to the system: an
        unloaded model (engine/pool.py) must free its memory for the next one."""
        self._gen = None
        self._model = None
        self._draft_model = None
        self._prefix = PrefixCache(0)
        gc.collect()  # the prefill gates tie the model's layers to this worker: a cycle
        mx.clear_cache()
        release_free_heap()

    def _load_draft_model(self) -> None:
        """``--draft-model``: loaded beside the model, on this thread, and refused at start-up
        unless its tokenizer is the model's (its token ids would mean other text)."""
        load = self._config.speculation.load_draft
        if load is None:
            return
        started = time.perf_counter()
        self._draft_model = load_draft_model(load, self._tokenizer)
        install_cpu_kernels(self._draft_model.model)
        log.info("draft model loaded in %.1f s", time.perf_counter() - started)

    def _serve_once(self, deliver: Deliver) -> bool:
        events: list[tuple[Ticket, Event]] = []
        changed = False
        # Block only while there is nothing to compute. Going idle, hand MLX's buffer cache
        # back to the system: an idle server should not sit on its peak memory.
        block = not self._seqs
        if block and not self._snapshot.idle:
            mx.clear_cache()
            release_free_heap()
            self._snapshot = replace(self._snapshot, idle=True)
            self._schedule(deliver, [], self._snapshot)
        while True:
            try:
                command = self._deferred.popleft() if self._deferred else self._take_command(block)
            except queue.Empty:
                if block:  # a quiet while: other ranks are told all is well (distributed)
                    self._on_idle_tick()
                break
            block = False
            if isinstance(command, Stop):
                self._on_stop()
                return False
            changed = True
            if isinstance(command, Submit):
                self._submit(command.ticket, events)
            else:
                self._cancel(command.ticket, events)
        if self._seqs:
            self._step(events)
            changed = True
        if changed:
            self._schedule(deliver, events, self._snapshot_now())
        return True

    # -- commands -----------------------------------------------------------------------

    def _submit(self, ticket: Ticket, events: list[tuple[Ticket, Event]]) -> None:
        req = ticket.request
        box = _FaultBox()
        try:
            # Everything that can fail for this request alone happens before insert, so a
            # failure leaves nothing of it in the batch.
            detokenizer = self._detokenizer(req)
            sampler = self._request_sampler(req)
            processors = [_guard_processor(box, p) for p in self._request_processors(req)]
            spec = make_spec_row(
                req,
                self._config.speculation,
                sampler=sampler,
                fault=box,
                has_processors=bool(processors),
                draft_model=self._draft_model,
            )
            if sampler is not None:
                sampler = _guard_sampler(box, sampler)
            prompt = list(req.prompt_tokens)
            cache, rest, cached = self._prefix.lookup(prompt)
            (uid,) = self._gen.insert(
                [rest],
                max_tokens=[req.max_tokens],
                caches=[cache],
                all_tokens=[prompt[:cached]],
                samplers=[sampler],
                logits_processors=[processors],
            )
            if spec is not None:
                self._gen.attach(uid, spec)
            self._on_insert(req, cached)
        except Exception as exc:  # a bad request must not take the worker down
            log.exception("request %s could not enter the batch", req.request_id)
            events.append((ticket, Failed(f"could not start generation: {type(exc).__name__}")))
            return
        seq = _Sequence(
            ticket=ticket,
            uid=uid,
            detokenizer=detokenizer,
            stops=StopStringFilter(req.stop),
            prompt_len=len(req.prompt_tokens),
            fault=box,
            cached=cached,
            spec=spec,
        )
        self._seqs[uid] = seq
        self._by_ticket[ticket] = seq

    # -- per-request seams (a test double overrides these to fail where real faults occur)

    def _request_sampler(self, req: GenerationRequest) -> Any:
        return make_request_sampler(req.sampling)

    def _request_processors(self, req: GenerationRequest) -> list[Any]:
        processors = make_request_processors(req.sampling)
        if req.constraint is not None:  # the grammar's mask goes last, after penalties
            processors.append(self._constraint_processor(req))
        return processors

    def _constraint_processor(self, req: GenerationRequest) -> Any:
        return make_constraint_processor(req.constraint, self._tokenizer)

    def _detokenizer(self, req: GenerationRequest) -> Any:
        return streaming_detokenizer(self._tokenizer, req.continues_prompt)

    def _store_prefix(self, req: GenerationRequest, tokens: list[int], cache: Any) -> None:
        self._prefix.store(tokens, cache)

    def _next(self) -> tuple[list[Any], list[Any]]:
        return self._gen.next()

    # -- seams of distributed serving (engine/distributed/): what every rank must mirror.
    # One process: they do nothing.

    _idle_tick_s: float | None = None  # a blocked wait for commands wakes this often

    def _take_command(self, block: bool) -> Submit | Cancel | Stop:
        """The next command; raises ``queue.Empty`` (at once, or after ``_idle_tick_s``)."""
        return self.commands.get(block, self._idle_tick_s if block else None)

    def _after_load(self) -> None:
        """The model is loaded, the batch not built yet."""

    def _on_insert(self, req: GenerationRequest, cached: int) -> None:
        """A request entered the batch, ``cached`` prompt tokens from the prefix cache."""

    def _on_remove(self, uid: int, keep_cache: bool) -> None:
        """A sequence is about to leave the batch."""

    def _agree_to_cut(self, cut: bool) -> bool:
        """Whether the prefill chunk in flight is cut (``cut``: this worker's own view)."""
        return cut

    def _after_next(self, generation_responses: list[Any]) -> None:
        """A step's tokens are out of the model."""

    def _on_batch_failed(self, exc: Exception) -> None:
        """A step or a removal raised; raise here to end the worker instead of going on."""

    def _on_idle_tick(self) -> None:
        """Nothing arrived for ``_idle_tick_s``."""

    def _on_stop(self) -> None:
        """``Stop`` was taken: the worker ends after this."""

    # -- removal ------------------------------------------------------------------------

    def _cancel(self, ticket: Ticket, events: list[tuple[Ticket, Event]]) -> None:
        seq = self._by_ticket.get(ticket)
        if seq is not None:
            try:
                self._drop(seq)
            except Exception as exc:  # the batch's state is unknown now
                self._fail_all(exc, events)

    def _drop(self, seq: _Sequence, keep_cache: bool = False) -> None:
        """Take the sequence out of the batch; with ``keep_cache``, offer its KV cache to the
        prefix cache (a failure there only loses the reuse, never the answer)."""
        self._seqs.pop(seq.uid, None)
        self._by_ticket.pop(seq.ticket, None)
        self._on_remove(seq.uid, keep_cache)
        caches = self._gen.remove([seq.uid], return_prompt_caches=keep_cache)
        if keep_cache and seq.uid in caches:
            cache, tokens = caches[seq.uid]
            self._keep_prefix(seq, tokens, cache)

    def _keep_prefix(self, seq: _Sequence, tokens: list[int], cache: Any) -> None:
        try:
            self._store_prefix(seq.ticket.request, tokens, cache)
        except Exception as exc:
            log.error(
                "request %s: could not keep its KV cache for prefix reuse: %r",
                seq.ticket.request.request_id,
                exc,
            )

    def _fail_one(
        self, seq: _Sequence, exc: BaseException, events: list[tuple[Ticket, Event]]
    ) -> None:
        """One sequence's own work raised: fail that request, drop it, the rest go on."""
        request_id = seq.ticket.request.request_id
        log.error("request %s failed: %s", request_id, _describe(exc), exc_info=exc)
        self._snapshot = replace(self._snapshot, failures=self._snapshot.failures + 1)
        if not seq.ended:
            seq.ended = True
            events.append((seq.ticket, Failed(_failure_message(exc))))
        if seq.uid not in self._seqs:
            return  # already out of the batch
        try:
            self._drop(seq)
        except Exception as drop_exc:  # the batch's state is unknown now
            self._fail_all(drop_exc, events)

    # -- one step -----------------------------------------------------------------------

    def _step(self, events: list[tuple[Ticket, Event]]) -> None:
        try:
            self._choose_prefill_step()
            if self._blas is not None:
                self._blas.before_step(self._wait_idle)
            prompt_responses, generation_responses = self._next()
            self._after_next(generation_responses)
            self._count_drafts()
        except PrefillCancelled:
            self._restart_after_cut()
            return
        except Exception as exc:
            # A failed step leaves the batch in an unknown state: fail it all, start afresh.
            self._fail_all(exc, events)
            return
        # A processor or sampler that raised inside the step marked its own sequence.
        for seq in [s for s in self._seqs.values() if s.fault.error is not None]:
            self._fail_one(seq, seq.fault.error, events)
        for r in prompt_responses:
            seq = self._seqs.get(r.uid)
            if seq is not None:
                # mlx-lm counts only what it prefills; report the whole prompt.
                processed, total = r.progress
                events.append(
                    (seq.ticket, PrefillProgress(processed + seq.cached, total + seq.cached))
                )
        for r in generation_responses:
            seq = self._seqs.get(r.uid)
            if seq is None:
                continue
            try:
                self._on_token(seq, r, events)
            except Exception as exc:
                self._fail_one(seq, exc, events)

    def _wait_idle(self) -> None:
        """Block until MLX has finished the step in flight (mlx-lm runs one step ahead)."""
        mx.synchronize(self._gen._stream)

    def _count_drafts(self) -> None:
        counts = getattr(self._gen, "counts", None)
        if counts is not None and self._gen.totals:
            self._snapshot = replace(self._snapshot, speculation=counts())

    def _choose_prefill_step(self) -> None:
        """Short prefill chunks while others decode (each chunk holds them up), long ones
        when nobody waits on the step (faster; a hang-up still cuts in between layers)."""
        step = self._config.prefill_step_size
        if self._config.solo_prefill_step_size and not len(self._gen._generation_batch):
            step = self._config.solo_prefill_step_size
        # mlx-lm reads the step from both at each next(); no public setter.
        self._gen.prefill_step_size = step
        self._gen._prompt_batch.prefill_step_size = step

    def _prefill_checkpoint(self) -> None:
        """Between two layers of a prefill chunk: take the commands that arrived, and cut the
        chunk short when every sequence in the batch has been cancelled (nobody else would
        lose anything by dropping the batch)."""
        while True:
            try:
                self._deferred.append(self.commands.get_nowait())
            except queue.Empty:
                break
        cancelled = {c.ticket for c in self._deferred if isinstance(c, Cancel)}
        cut = bool(self._seqs) and all(seq.ticket in cancelled for seq in self._seqs.values())
        if self._agree_to_cut(cut):
            raise PrefillCancelled

    def _restart_after_cut(self) -> None:
        """A chunk was cut mid-model: the batch's caches are half-written, so start a fresh
        batch. Everything in it was cancelled; its consumers are gone."""
        log.info("prefill cut short between layers: all %d sequence(s) cancelled", len(self._seqs))
        self._seqs.clear()
        self._by_ticket.clear()
        self._snapshot = replace(self._snapshot, prefill_cuts=self._snapshot.prefill_cuts + 1)
        self._gen.close()
        self._gen = self._new_generator()

    def _on_token(self, seq: _Sequence, r: Any, events: list[tuple[Ticket, Event]]) -> None:
        seq.generated += 1
        is_eos = r.token in self._tokenizer.eos_token_ids
        reason = r.finish_reason
        if not is_eos:
            seq.detokenizer.add_token(r.token)
        if reason is not None:
            seq.detokenizer.finalize()
        text = seq.stops.feed(seq.detokenizer.last_segment)
        if seq.stops.stopped:
            reason = "stop"
        elif reason is not None:
            text += seq.stops.flush()
        req = seq.ticket.request
        logprob, top, chosen = (None, (), None)
        if req.sampling.logprobs and not is_eos:
            logprob, top = self._logprobs(r.token, r.logprobs, req.sampling.top_logprobs)
            chosen = self._top_entry(r.token, logprob)
        if not (is_eos and not text):
            piece = (chosen.token, chosen.bytes) if chosen else (None, None)
            events.append((seq.ticket, TokenDelta(r.token, text, logprob, top, *piece)))
        if reason is None:
            return
        # An end-of-sequence token is not part of the answer.
        completion = seq.generated - (1 if is_eos else 0)
        usage = Usage(
            prompt_tokens=seq.prompt_len,
            completion_tokens=completion,
            cached_tokens=seq.cached,
            **_prediction_usage(seq),
        )
        events.append((seq.ticket, Finished(reason, usage, seq.stops.matched)))
        seq.ended = True
        if r.finish_reason is None:
            self._drop(seq, keep_cache=True)  # stopped by a stop string: still in the batch
        else:  # mlx-lm has let it go already
            self._seqs.pop(seq.uid, None)
            self._by_ticket.pop(seq.ticket, None)
            self._keep_prefix(seq, r.all_tokens, r.prompt_cache)

    def _logprobs(
        self, token: int, logprobs: mx.array, top_n: int
    ) -> tuple[float, tuple[TopLogprob, ...]]:
        chosen = logprobs[token].item()
        if top_n <= 0:
            return chosen, ()
        ids = mx.argpartition(-logprobs, top_n - 1)[:top_n]
        values = logprobs[ids].tolist()
        pairs = sorted(zip(ids.tolist(), values, strict=True), key=lambda p: -p[1])
        top = tuple(self._top_entry(i, v) for i, v in pairs)
        return chosen, top

    def _top_entry(self, token_id: int, logprob: float) -> TopLogprob:
        text, raw = token_piece(self._tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    def _fail_all(self, exc: Exception, events: list[tuple[Ticket, Event]]) -> None:
        """A step raised: fail everything in the batch, then start from a fresh batch."""
        self._on_batch_failed(exc)
        log.error(
            "model step failed; failing %d request(s): %s",
            len(self._seqs),
            _describe(exc),
            exc_info=exc,
        )
        for seq in self._seqs.values():
            if not seq.ended:
                events.append(
                    (seq.ticket, Failed(f"the model failed during generation: {_describe(exc)}"))
                )
        self._seqs.clear()
        self._by_ticket.clear()
        self._snapshot = replace(self._snapshot, failures=self._snapshot.failures + 1)
        self._gen.close()
        self._gen = self._new_generator()

    # -- helpers ------------------------------------------------------------------------

    def _new_generator(self) -> BatchGenerator:
        eos = [[t] for t in sorted(self._tokenizer.eos_token_ids)]
        return SpecBatchGenerator(
            self._model,
            speculation=self._config.speculation,
            totals=self._draft_totals,
            stop_tokens=eos,
            completion_batch_size=self._config.parallel,
            prefill_batch_size=self._config.parallel,
            prefill_step_size=self._config.prefill_step_size,
        )

    def _warm_up(self) -> None:
        """One tiny generation so the first real request does not pay for allocation."""
        started = time.perf_counter()
        (uid,) = self._gen.insert([[0, 1]], max_tokens=[2])
        while True:
            _, generated = self._gen.next()
            if any(r.uid == uid and r.finish_reason for r in generated):
                break
        log.debug("warm-up took %.2f s", time.perf_counter() - started)

    def _snapshot_now(self) -> WorkerSnapshot:
        gen = self._gen
        stats = gen._counters  # mlx-lm keeps running totals here
        # mlx-lm keeps, per sequence, the list of the tokens its KV cache holds (``tokens``;
        # the prefix-cache hit, ``all_tokens``, while still queued): Python lists, so this
        # reads no MLX array and costs nothing next to a step.
        kv_tokens = (
            sum(len(queued[4]) for queued in gen._unprocessed_sequences)
            + sum(map(len, gen._prompt_batch.tokens))
            + sum(map(len, gen._generation_batch.tokens))
        )
        self._snapshot = replace(
            self._snapshot,
            in_batch=_batch_size(gen),
            kv_tokens=kv_tokens,
            tracked=len(self._seqs),
            prefix_cache_bytes=self._prefix.nbytes,
            idle=False,
            steps=self._snapshot.steps + 1,
            prompt_tokens=stats.prompt_tokens,
            generated_tokens=stats.generation_tokens,
            blas_threads=self._blas.threads if self._blas is not None else 0,
            blas_thread_changes=self._blas.changes if self._blas is not None else 0,
        )
        return self._snapshot


def _blas_threads(setting: int | str | None) -> BlasThreads | None:
    """The thread-count keeper for ``setting``, or None: no setting, or no OpenBLAS to set."""
    if setting is None:
        return None
    set_threads = thread_setter()
    if set_threads is None:
        log.info("BLAS threads: not settable (no OpenBLAS loaded); %s ignored", setting)
        return None
    keeper = BlasThreads(set_threads, setting)
    log.info(
        "BLAS threads: %s",
        f"auto (the free ones of {keeper.cores} cores, checked every 0.5 s)"
        if keeper.auto
        else keeper.threads,
    )
    return keeper


def _guard_processor(box: _FaultBox, processor: Callable) -> Callable:
    """A logits processor that records its first error instead of failing the whole step."""

    def guarded(tokens: mx.array, logits: mx.array) -> mx.array:
        if box.error is None:
            try:
                return processor(tokens, logits)
            except Exception as exc:
                box.error = exc
            except BaseException as exc:  # native panics; never KeyboardInterrupt here
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                box.error = exc
        return logits  # the sequence is failed and dropped right after this step

    return guarded


def _guard_sampler(box: _FaultBox, sampler: Callable) -> Callable:
    """A per-request sampler that records its first error instead of failing the step."""

    def guarded(logprobs: mx.array) -> mx.array:
        if box.error is None:
            try:
                return sampler(logprobs)
            except Exception as exc:
                box.error = exc
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                box.error = exc
        return mx.argmax(logprobs, axis=-1)

    return guarded


def _prediction_usage(seq: _Sequence) -> dict[str, int]:
    """A predicted output's accepted and rejected draft tokens, for the usage."""
    spec = seq.spec
    if spec is None or spec.method != "prediction":
        return {}
    stats = spec.by_method.get("prediction") or type(spec.stats)()  # its own drafts only
    return {
        "accepted_prediction_tokens": stats.accepted,
        "rejected_prediction_tokens": stats.proposed - stats.accepted,
    }


def _describe(exc: BaseException) -> str:
    """For logs and the engine's failure reason: the type, and the message if short."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _failure_message(exc: BaseException) -> str:
    """What the client is told. A ``ClientSafeError`` (e.g. a grammar violation) carries a
    message meant for it; anything else names only the kind of failure."""
    if getattr(exc, "client_safe", False):
        return str(exc)
    return f"the model failed on this request ({type(exc).__name__})"


def _batch_size(gen: BatchGenerator) -> int:
    """Every sequence mlx-lm still holds, at any stage."""
    return len(gen._unprocessed_sequences) + len(gen._prompt_batch) + len(gen._generation_batch)
