"""Engine events in, one wire dialect's output out: sans-IO, for streamed and whole answers.

The pipeline is the same for every dialect::

    engine events ─► Assembler ─► neutral pieces ─► Renderer (one per dialect) ─► frames | body

The ``Assembler`` owns what is dialect-neutral: the content/reasoning/tool-call shaper, the
prefill-progress phase (no progress after the first content), the one-terminal-frame rule,
the text kept for the debug log. A ``Renderer`` turns neutral pieces into its wire format: SSE
frames while streaming, one body for a whole answer. A whole answer is the same piece stream
gathered (``add`` then ``body``), not a second code path. No awaits, no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from trioserve.engine.events import Event, Failed, Finished, PrefillProgress, TokenDelta, Usage
from trioserve.output import sse
from trioserve.output.pieces import ContentPiece, Piece
from trioserve.output.progress import ProgressReporter
from trioserve.output.shaper import ShapingSpec, make_shaper


class Renderer(Protocol):
    """One response in one wire format. Streamed: ``opening`` first, then ``progress``*,
    ``content_start`` once, ``pieces``*, and ``finish`` or ``error`` last. Whole: ``whole``."""

    #: The id the client sees (chatcmpl-…, resp_…, msg_…); logs name the answer by it.
    response_id: str

    #: Whether ``opening`` needs the prompt's size (Messages' ``message_start`` carries it):
    #: a stream whose model still loads then sends it only once the prompt is tokenized.
    opening_needs_prompt: bool

    def opening(self, prompt_tokens: int) -> list[bytes]:
        """Frames sent as soon as the stream starts (before queueing or prefill)."""
        ...

    def progress(self, fields: dict[str, Any]) -> bytes:
        """One prefill-progress frame (``ProgressReporter.fields``)."""
        ...

    def keepalive(self) -> bytes | None:
        """A frame every strict client of the dialect skips, sent by the heartbeat while the
        prompt is read when no progress was asked for (Anthropic's ``ping``); None: none."""
        ...

    def content_start(self) -> list[bytes]:
        """Frames before the first output (the prompt is read)."""
        ...

    def pieces(self, pieces: Sequence[Piece], deltas: Sequence[TokenDelta]) -> list[bytes]:
        """Frames for output pieces; ``deltas`` are the tokens behind them (logprobs)."""
        ...

    def finish(self, reason: str, usage: Usage, stop_sequence: str | None = None) -> list[bytes]:
        """The closing frames of an answer (``reason``: stop, length or tool_calls;
        ``stop_sequence``: the stop string that ended it, if one did)."""
        ...

    def error(self, message: str, code: str, error_type: str) -> list[bytes]:
        """The closing frames of a stream that ends without an answer."""
        ...

    def whole(
        self,
        pieces: Sequence[Piece],
        deltas: Sequence[TokenDelta],
        reason: str,
        usage: Usage,
        stop_sequence: str | None = None,
    ) -> dict[str, Any]:
        """The body of a whole (non-streamed) answer."""
        ...


class Assembler:
    def __init__(
        self,
        renderer: Renderer,
        *,
        shaping: ShapingSpec | None = None,
        logprobs: bool = False,
        progress: bool = False,
    ) -> None:
        self.renderer = renderer
        self.logprobs = logprobs
        self.progress = progress
        self.reporter: ProgressReporter | None = None  # set once the request is queued
        self.content_started = False  # no progress frame may follow the first content
        self.ended = False  # a terminal frame was made
        self.opened = False  # the renderer's opening frames are out
        self._shaper = make_shaper(shaping)
        self._deltas: list[TokenDelta] = []
        self._pieces: list[Piece] = []
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """Everything generated so far, as the engine sent it (before shaping)."""
        return "".join(self._text)

    # -- streamed --------------------------------------------------------------------------

    def opening(self, prompt_tokens: int | None) -> list[bytes]:
        """The renderer's opening frames, once. ``None``: the prompt is not known yet (the
        model loads); a renderer whose opening carries its size then waits for it."""
        if self.opened or (prompt_tokens is None and self.renderer.opening_needs_prompt):
            return []
        self.opened = True
        return self.renderer.opening(prompt_tokens or 0)

    def set_shaping(self, shaping: ShapingSpec | None) -> None:
        """The shaping a pending stream learns once its prompt is prepared (before content)."""
        assert not self.content_started, "shaping is set before the first content"
        self._shaper = make_shaper(shaping)

    def loading_frame(self, fields: dict[str, Any]) -> bytes:
        """The heartbeat's frame while the model loads: progress (``LoadingReporter``) if
        asked for and the opening is out (progress never precedes it), else the dialect's
        keepalive, else an SSE comment, which every SSE parser skips."""
        if self.progress and self.opened:
            return self.renderer.progress(fields)
        return self.renderer.keepalive() or sse.comment("loading")

    def frames(self, event: Event) -> list[bytes]:
        """The frames this event adds to the stream (a ``Failed`` adds none: the caller
        reports the ending with ``error_frames``)."""
        if isinstance(event, PrefillProgress):
            if self.progress and not self.content_started and self.reporter is not None:
                return [self.renderer.progress(self.reporter.fields(event.processed))]
            return []
        if isinstance(event, TokenDelta):
            return self._content_start() + self._token_frames(event)
        if isinstance(event, Finished):
            return self._content_start() + self._finish_frames(event)
        assert isinstance(event, Failed)
        return []

    @property
    def wants_heartbeat(self) -> bool:
        """Whether a heartbeat task should run: opt-in progress, or a dialect keepalive."""
        return self.progress or self.renderer.keepalive() is not None

    def heartbeat_frame(self) -> bytes | None:
        """The heartbeat's frame (progress if asked for, else the dialect's keepalive), or
        None once content has started."""
        if self.content_started or self.reporter is None:
            return None
        if self.progress:
            return self.renderer.progress(self.reporter.fields())
        return self.renderer.keepalive()

    def error_frames(
        self, message: str, code: str, error_type: str = "server_error"
    ) -> list[bytes]:
        """The end of a stream without an answer; only one terminal per stream."""
        if self.ended:
            return []
        self.ended = True
        self.content_started = True
        return self.renderer.error(message, code, error_type)

    def _content_start(self) -> list[bytes]:
        """Close the prefill phase once: a last progress frame at 1.0, then the opening of
        the output."""
        if self.content_started:
            return []
        self.content_started = True
        out = []
        if self.progress and self.reporter is not None and self.reporter.last_fraction < 1.0:
            out.append(self.renderer.progress(self.reporter.final()))
        return out + self.renderer.content_start()

    def _token_frames(self, event: TokenDelta) -> list[bytes]:
        pieces = self._shape(event)
        if not pieces and not self.logprobs:
            return []
        return self.renderer.pieces(pieces, (event,))

    def _finish_frames(self, event: Finished) -> list[bytes]:
        out = []
        if self._shaper is not None:  # what the shaper held back
            held = self._shaper.finish()
            if held:
                out += self.renderer.pieces(held, ())
        out += self.renderer.finish(self._reason(event), event.usage, event.stop_sequence)
        self.ended = True
        return out

    # -- whole ------------------------------------------------------------------------------

    def add(self, event: Event) -> None:
        """Take one event of a whole (non-streamed) answer."""
        if isinstance(event, TokenDelta):
            self._deltas.append(event)
            self._pieces += self._shape(event)

    def body(self, finished: Finished) -> dict[str, Any]:
        """The response body of a whole answer: the same pieces a stream would carry."""
        if self._shaper is not None:
            self._pieces += self._shaper.finish()
        reason = self._reason(finished)
        return self.renderer.whole(
            self._pieces, self._deltas, reason, finished.usage, finished.stop_sequence
        )

    # -- shared -----------------------------------------------------------------------------

    def _shape(self, event: TokenDelta) -> list[Piece]:
        self._text.append(event.text)
        if self._shaper is not None:
            return self._shaper.feed(event.text)
        return [ContentPiece(event.text)] if event.text else []

    def _reason(self, finished: Finished) -> str:
        """The neutral finish reason: ``tool_calls`` when an answer ended by calling tools."""
        if self._shaper is None:
            return finished.reason
        return self._shaper.finish_reason(finished.reason)
