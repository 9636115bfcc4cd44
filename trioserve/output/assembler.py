"""Engine events in, Chat/Completions output out: sans-IO, for streamed and whole answers.

One ``Assembler`` per response. A streamed answer asks ``frames(event)`` for the SSE frames
each event adds (``data:`` chunks, the opt-in ``prefill_progress`` events, ``[DONE]``); a whole
answer calls ``add(event)`` for each and ``body(finished)`` at the end. Both share one account
of the text, the tokens behind it and the content/reasoning/tool-call shaping, so the two
paths cannot drift apart. No awaits, no sockets: tested with plain event lists.
"""

from __future__ import annotations

from typing import Any

from trioserve.engine.events import Event, Failed, Finished, PrefillProgress, TokenDelta
from trioserve.output import sse
from trioserve.output.chunks import ChunkBuilder, error_payload
from trioserve.output.progress import PROGRESS_EVENT, ProgressReporter
from trioserve.output.shaper import ShapingSpec, make_shaper, shape_text


class Assembler:
    def __init__(
        self,
        builder: ChunkBuilder,
        *,
        shaping: ShapingSpec | None = None,
        logprobs: bool = False,
        include_usage: bool = False,
        progress: bool = False,
    ) -> None:
        self.builder = builder
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.progress = progress
        self.reporter: ProgressReporter | None = None  # set once the request is queued
        self.content_started = False  # no progress frame may follow the first content
        self.ended = False  # a terminal frame ([DONE] after an answer or an error) was made
        self._spec = shaping
        self._shaper = make_shaper(shaping)
        self._deltas: list[TokenDelta] = []
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything generated so far, as the engine sent it (before shaping)."""
        return "".join(self._pieces)

    # -- streamed --------------------------------------------------------------------------

    def frames(self, event: Event) -> list[bytes]:
        """The SSE frames this event adds to the stream (a ``Failed`` adds none: the caller
        reports the ending with ``error_frames``)."""
        if isinstance(event, PrefillProgress):
            if self.progress and not self.content_started and self.reporter is not None:
                return [progress_frame(self.reporter.chunk(event.processed))]
            return []
        if isinstance(event, TokenDelta):
            return self._open_content() + self._token_frames(event)
        if isinstance(event, Finished):
            return self._open_content() + self._finish_frames(event)
        assert isinstance(event, Failed)
        return []

    def heartbeat_frame(self) -> bytes | None:
        """A progress frame for the heartbeat, or None once content has started."""
        if not self.progress or self.content_started or self.reporter is None:
            return None
        return progress_frame(self.reporter.chunk())

    def error_frames(
        self, message: str, code: str, error_type: str = "server_error"
    ) -> list[bytes]:
        """Once the headers are out, an error travels as a ``data:`` error body, then
        ``[DONE]``. Only one terminal frame per stream."""
        if self.ended:
            return []
        self.ended = True
        self.content_started = True
        return [sse.data(error_payload(message, error_type, code=code)), sse.DONE]

    def _open_content(self) -> list[bytes]:
        """Close the prefill phase once: a last progress event at 1.0, then the role chunk."""
        if self.content_started:
            return []
        self.content_started = True
        out = []
        if self.progress and self.reporter is not None and self.reporter.last_fraction < 1.0:
            out.append(progress_frame(self.reporter.final_chunk()))
        out.append(sse.data(self.builder.role_chunk()))
        return out

    def _token_frames(self, event: TokenDelta) -> list[bytes]:
        self._pieces.append(event.text)
        if self._shaper is not None:
            shaped = self._shaper.feed(event.text)
            chunks = self.builder.piece_chunks(shaped, (event,), self.logprobs)
            return [sse.data(chunk) for chunk in chunks]
        if event.text or self.logprobs:
            return [sse.data(self.builder.content_chunk(event.text, (event,), self.logprobs))]
        return []

    def _finish_frames(self, event: Finished) -> list[bytes]:
        out = []
        reason = event.reason
        if self._shaper is not None:  # what the shaper held back, then maybe "tool_calls"
            out += [sse.data(chunk) for chunk in self.builder.piece_chunks(self._shaper.finish())]
            reason = self._shaper.finish_reason(reason)
        out.append(sse.data(self.builder.finish_chunk(reason)))
        if self.include_usage:
            out.append(sse.data(self.builder.usage_chunk(event.usage)))
        out.append(sse.DONE)
        self.ended = True
        return out

    # -- whole ------------------------------------------------------------------------------

    def add(self, event: Event) -> None:
        """Take one event of a whole (non-streamed) answer."""
        if isinstance(event, TokenDelta):
            self._deltas.append(event)
            self._pieces.append(event.text)

    def body(self, finished: Finished) -> dict[str, Any]:
        """The response body of a whole answer."""
        builder, text, usage = self.builder, self.text, finished.usage
        if self._spec is not None:  # split into content, reasoning and tool calls
            message, reason = shape_text(self._spec, text, finished.reason)
            return builder.chat_response(
                message.content,
                reason,
                usage,
                self._deltas,
                self.logprobs,
                tool_calls=message.tool_calls,
                reasoning=message.reasoning,
            )
        make = builder.chat_response if builder.kind == "chat" else builder.completion_response
        return make(text, finished.reason, usage, self._deltas, self.logprobs)


def progress_frame(chunk: dict) -> bytes:
    return sse.event(PROGRESS_EVENT, chunk)
