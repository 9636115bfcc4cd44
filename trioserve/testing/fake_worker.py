"""A scripted stand-in for the MLX worker, for exact, fast tests of everything above it.

It speaks the real worker's protocol (``Submit``/``Cancel``/``Stop`` in, ``deliver(events,
snapshot)`` out) but runs as a Trio task and takes its time with ``trio.sleep``, so under
``trio.testing.MockClock(autojump_threshold=0)`` a whole stream runs in milliseconds with
exact interleavings. Each submitted request gets prompt chunks of ``chunk`` tokens, one per
step, then one token per step up to ``max_tokens``, then ``Finished("length")``.

Tests steer it: ``fail(request_id)`` makes the next step fail that request, ``crash()`` makes
the next step end the worker with an exception (as a dead MLX thread would), and
``finished`` is an event set once a request's ``Finished`` went out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from trioserve.engine.events import Failed, Finished, PrefillProgress, TokenDelta, Usage
from trioserve.engine.worker import (
    Cancel,
    Deliver,
    Stop,
    Submit,
    Ticket,
    WorkerConfig,
    WorkerSnapshot,
)


class FakeCrash(RuntimeError):
    """What a crashed fake worker raises."""


class FakeTokenizer:
    eos_token_ids = frozenset({0})

    def __len__(self) -> int:
        return 1000

    def decode(self, tokens: list[int]) -> str:
        return "".join(f"t{t} " for t in tokens)


class _Commands:
    """The thread-safe queue's interface, over a Trio channel (the fake is on Trio's thread)."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)

    def put(self, command: Submit | Cancel | Stop) -> None:
        self.send.send_nowait(command)


@dataclass
class _Seq:
    ticket: Ticket
    processed: int = 0
    generated: int = 0


@dataclass
class FakeWorker:
    config: WorkerConfig
    step_s: float = 0.1
    chunk: int = 8
    commands: _Commands = field(default_factory=_Commands)
    steps: int = 0
    finished: dict[str, trio.Event] = field(default_factory=dict)
    _seqs: dict[Ticket, _Seq] = field(default_factory=dict)
    _fail: set[str] = field(default_factory=set)
    _crash: bool = False

    @classmethod
    def factory(cls, **options: Any) -> Callable[[WorkerConfig, Callable[..., None]], FakeWorker]:
        """An ``EngineConfig.worker_factory``; ``created`` on it lists the workers made."""
        created: list[FakeWorker] = []

        def make(config: WorkerConfig, schedule: Callable[..., None]) -> FakeWorker:
            worker = cls(config, **options)
            created.append(worker)
            return worker

        make.created = created  # type: ignore[attr-defined]
        return make

    # -- steering ---------------------------------------------------------------------------

    def fail(self, request_id: str) -> None:
        self._fail.add(request_id)

    def crash(self) -> None:
        self._crash = True

    def finished_event(self, request_id: str) -> trio.Event:
        return self.finished.setdefault(request_id, trio.Event())

    @property
    def tracked(self) -> int:
        return len(self._seqs)

    # -- the worker protocol ----------------------------------------------------------------

    async def run_async(self, on_ready: Callable[[Any], None], deliver: Deliver) -> None:
        on_ready(FakeTokenizer())
        while True:
            if not self._seqs:
                if not self._take(await self.commands.receive.receive(), deliver):
                    return
            while True:
                try:
                    command = self.commands.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if not self._take(command, deliver):
                    return
            if self._seqs or self._crash:
                await trio.sleep(self.step_s)
                deliver(self._step(), self._snapshot())

    def _take(self, command: Submit | Cancel | Stop, deliver: Deliver) -> bool:
        if isinstance(command, Stop):
            return False
        if isinstance(command, Submit):
            self._seqs[command.ticket] = _Seq(command.ticket)
        else:
            self._seqs.pop(command.ticket, None)
        deliver([], self._snapshot())
        return True

    def _step(self) -> list[tuple[Ticket, Any]]:
        self.steps += 1
        if self._crash:
            self._seqs.clear()
            raise FakeCrash("the fake worker crashed")
        events: list[tuple[Ticket, Any]] = []
        for seq in list(self._seqs.values()):
            req = seq.ticket.request
            total = len(req.prompt_tokens)
            if req.request_id in self._fail:
                events.append((seq.ticket, Failed("the model failed on this request (fake)")))
                del self._seqs[seq.ticket]
            elif seq.processed < total:
                seq.processed = min(total, seq.processed + self.chunk)
                events.append((seq.ticket, PrefillProgress(seq.processed, total)))
            else:
                seq.generated += 1
                token = 100 + seq.generated
                events.append((seq.ticket, TokenDelta(token, f"w{seq.generated} ")))
                if seq.generated >= req.max_tokens:
                    usage = Usage(total, seq.generated)
                    events.append((seq.ticket, Finished("length", usage)))
                    del self._seqs[seq.ticket]
                    self.finished_event(req.request_id).set()
        return events

    def _snapshot(self) -> WorkerSnapshot:
        n = len(self._seqs)
        kv_tokens = sum(s.processed + s.generated for s in self._seqs.values())
        return WorkerSnapshot(in_batch=n, tracked=n, steps=self.steps, kv_tokens=kv_tokens)
