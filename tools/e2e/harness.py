"""What the client drivers of tools/e2e share: one strict client run against trioserve.

``codex_run.py``, ``claude_run.py`` and ``opencode_run.py`` each run one real coding-agent CLI
and judge what it did. The steps around the client are the same for all of them, and live here:

- a scratch HOME: ``scratch_env`` makes the folders and returns a closed environment (nothing
  inherited but PATH), ``require_client`` fails with the fix when a CLI is not installed;
- the relay: ``relayed`` starts a ``recorder.Recorder`` between the client and the server,
  ``Relay.run`` runs the client in a session of its own under a timeout (its whole process
  group killed on the way out), and ``Relay.outcome`` gives the fields of a ``ClientRun``;
- the server: ``start_logged_server`` (a driver's own server, logging to ``server.log``), or
  ``FakeServer``, the base of the hand-written streams that check a driver without a model;
- the verdict: the reasons every driver gives in the same words (``timeout_reasons``,
  ``exit_reasons``, ``last_answer_reasons``, ``progress_reasons``) and the ``report`` dict;
- the command line: ``add_target_args`` / ``check_target_args`` (``--server``,
  ``--server-log``, ``--fake``), ``scratch_folder``, ``open_target``, ``finish``, and
  ``save_requests`` (``--save-requests DIR``).

What the server logged is read back by ``serverlog``; what went over the wire, by ``recorder``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import trio

from trioserve.testing import ServerProcess, free_port, start_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorder import Exchange, Recorder  # noqa: E402
from serverlog import normalized  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NODE_BIN = Path(__file__).resolve().parent / "node_modules" / ".bin"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "What is the capital of France?"
PROGRESS_HEADER = "X-SwiftLM-Prefill-Progress"
CONTEXT_LIMIT = 8192  # SmolLM2's max_position_embeddings

# -- the client's scratch HOME -------------------------------------------------------------------


def require_client(path: Path) -> None:
    """Fail with the fix when a pinned CLI is not installed."""
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: run tools/setup_e2e.sh")


def scratch_env(dirs: Mapping[str, Path], **extra: str) -> dict[str, str]:
    """A closed environment: nothing inherited but PATH. ``dirs`` (HOME, TMPDIR, ...) are
    made and set; ``extra`` variables come after them."""
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        **{name: str(path) for name, path in dirs.items()},
        "NO_COLOR": "1",
        **extra,
    }


# -- one client run through the relay ------------------------------------------------------------


@dataclass(kw_only=True)
class ClientRun:
    """What one client run did; each driver's run adds what is its own."""

    returncode: int | None
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str
    exchanges: list[Exchange] = field(default_factory=list)


async def _kill_group(process: trio.Process) -> None:
    """The CLIs start helpers (sandboxes, shells, the commands they run), and each runs in a
    session of its own: end its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class Relay:
    """A ``Recorder`` on ``port`` (relaying to the server) for one client run; see ``relayed``."""

    def __init__(self, upstream_port: int, output: Path) -> None:
        self.recorder = Recorder(upstream_port)
        self.stdout_path = output.with_name(output.name + ".stdout")
        self.stderr_path = output.with_name(output.name + ".stderr")
        self.port: int | None = None
        self.nursery: trio.Nursery | None = None  # for more helpers (claude_run's Sink)
        self.returncode: int | None = None
        self.timed_out = False
        self.started = time.monotonic()

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout_s: float,
        stdin: bytes = b"",
    ) -> None:
        """The client, its output in ``<output>.stdout`` / ``.stderr``, killed at the timeout."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            with trio.move_on_after(timeout_s) as deadline:
                done = await trio.run_process(
                    list(argv),
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    check=False,
                    cwd=cwd,
                    env=dict(env),
                    start_new_session=True,
                    deliver_cancel=_kill_group,
                )
                self.returncode = done.returncode
        self.timed_out = deadline.cancelled_caught

    def outcome(self) -> dict:
        """``ClientRun``'s fields, once the relay is closed."""
        return {
            "returncode": self.returncode,
            "timed_out": self.timed_out,
            "seconds": round(time.monotonic() - self.started, 1),
            "stdout": self.stdout_path.read_text(errors="replace"),
            "stderr": self.stderr_path.read_text(errors="replace"),
            "exchanges": self.recorder.exchanges(),
        }


@contextlib.asynccontextmanager
async def relayed(upstream_port: int, output: Path) -> AsyncIterator[Relay]:
    """A listening ``Relay`` for the block (the client's base URL is on ``relay.port``),
    closed on the way out; ``output`` names the client's ``.stdout`` / ``.stderr`` files."""
    relay = Relay(upstream_port, output)
    async with trio.open_nursery() as nursery:
        relay.nursery = nursery
        relay.port = await nursery.start(relay.recorder.serve)
        yield relay
        nursery.cancel_scope.cancel()


# -- the server ----------------------------------------------------------------------------------


def start_logged_server(
    folder: Path, launch: Callable[[int], tuple[list[str], dict[str, str] | None]], **options
) -> ServerProcess:
    """A healthy server on a free port, logging to ``folder/server.log``: ``launch(port)``
    gives its argv and environment; ``options`` go to ``ServerProcess``."""
    port = free_port()
    argv, env = launch(port)
    return start_server(argv, port, log_path=folder / "server.log", env=env, **options)


class FakeServer:
    """A hand-written stand-in for trioserve on a loopback port, for a ``with`` block.

    Each POST goes to ``answer(path, raw_body, progress)`` (progress: the request opted in
    with ``PROGRESS_HEADER``), which returns status, body and content type. ``log_text``
    writes an answer's text the way trioserve's debug log does, so a verdict reads it back.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.count = 0
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                progress = (self.headers.get(PROGRESS_HEADER) or "").lower() == "true"
                status, body, ctype = fake.answer(self.path, raw, progress)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def next_number(self) -> int:
        """1, 2, ...: this request's number (the handler runs a thread per connection)."""
        with self.lock:
            self.count += 1
            return self.count

    def log_text(self, n: int, answer_id: str, text: str) -> None:
        with self.log_path.open("a") as log:
            log.write(f"DEBUG fake: request {n} ({answer_id}) text: {text!r}\n")

    def answer(self, path: str, raw: bytes, progress: bool) -> tuple[int, bytes, str]:
        raise NotImplementedError


# -- reading the wire ----------------------------------------------------------------------------


def stream_events(exchange: Exchange) -> list[dict]:
    """Each SSE event's JSON data (``event:`` name kept as ``_event``); unparseable data kept."""
    out = []
    for event in exchange.sse_events():
        try:
            data = json.loads(event.data)
        except ValueError:
            data = {"unparseable": event.data}
        if not isinstance(data, dict):
            data = {"value": data}
        out.append({"_event": event.name, **data})
    return out


def error_body(exchange: Exchange) -> object:
    """A non-200 answer's JSON body (None for a 200, or a body that is not JSON)."""
    if exchange.status == 200:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(exchange.response_body)
    return None


def is_progress(event: dict, *, not_named: Iterable[str] = ()) -> bool:
    """A prefill progress event, whatever form the server chose (``not_named``: event names
    that hold "progress" and are something else)."""
    names = [event.get("_event"), event.get("type")]
    return any(isinstance(n, str) and "progress" in n and n not in not_named for n in names)


# -- the verdict ---------------------------------------------------------------------------------


def timeout_reasons(client: str, run: ClientRun) -> list[str]:
    return [f"{client} did not finish in time ({run.seconds} s)"] if run.timed_out else []


def exit_reasons(client: str, run: ClientRun) -> list[str]:
    if not run.timed_out and run.returncode != 0:
        return [f"{client} exited with {run.returncode}"]
    return []


def shown_text_reasons(client: str, text: str | None, stdout: str, *, missing: str) -> list[str]:
    """The text the server logged (``missing`` when it logged none) is in the client's output."""
    if text is None:
        return [missing]
    if not text.strip():
        return ["the server generated an empty answer: nothing to find in the output"]
    if normalized(text) not in normalized(stdout):
        return [f"{client}'s output does not contain the text the server generated"]
    return []


def last_answer_reasons(
    client: str, run: ClientRun, final: dict, *, id_key: str, id_name: str
) -> list[str]:
    """The last stream's id (``final[id_key]``, a ``id_name`` id) is logged with its text,
    and the client printed that text."""
    answer_id = final[id_key]
    if answer_id is None:
        return [f"the last stream carried no {id_name} id"]
    missing = f"no server log line for the last stream ({answer_id})"
    return shown_text_reasons(client, final["logged_text"], run.stdout, missing=missing)


def progress_reasons(opted_in: bool, requests: list[dict]) -> list[str]:
    """Opted in: every request carried the header and the first stream held progress events;
    else none did and no stream held any."""
    reasons = []
    headers = {r["progress_header"] for r in requests}
    if opted_in:
        if headers != {"true"}:
            reasons.append(f"a request lacked the {PROGRESS_HEADER} header: {headers}")
        if requests[0]["progress_events"] < 1:
            reasons.append("the first stream held no prefill progress event")
    else:
        if headers != {None}:
            reasons.append(f"a request carried the {PROGRESS_HEADER} header unasked")
        if any(r["progress_events"] for r in requests):
            reasons.append("a stream held progress events nobody asked for")
    return reasons


def report(
    run: ClientRun,
    reasons: list[str],
    head: Mapping[str, object],
    tail: Mapping[str, object],
) -> dict:
    """The JSON report: ok, reasons, ``head``, the run's exit and output, ``tail``."""
    return {
        "ok": not reasons,
        "reasons": reasons,
        **head,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "seconds": run.seconds,
        "stdout": run.stdout,
        "stderr_tail": run.stderr[-4000:],
        **tail,
    }


# -- requests as fixtures ------------------------------------------------------------------------


def request_fixture(exchange: Exchange, replacements: Sequence[tuple[str, str]]) -> dict:
    """One request as JSON, with ``replacements`` (the scratch folder's path made neutral)
    applied to its body and the relay's port made neutral."""
    text = exchange.request_body.decode("utf-8", errors="replace")
    for old, new in replacements:
        text = text.replace(old, new)
    headers = dict(exchange.request_headers)
    headers["host"] = "127.0.0.1:PORT"
    return {
        "method": exchange.method,
        "target": exchange.target,
        "headers": headers,
        "body": json.loads(text),
    }


def save_requests(
    exchanges: list[Exchange],
    mode: str,
    folder: Path,
    replacements: Sequence[tuple[str, str]],
) -> list[str]:
    """Each request as ``folder/<mode>_request_<n>.json``; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, exchange in enumerate(exchanges):
        path = folder / f"{mode}_request_{i + 1}.json"
        path.write_text(json.dumps(request_fixture(exchange, replacements), indent=2) + "\n")
        names.append(str(path))
    return names


# -- the command line ----------------------------------------------------------------------------


def add_target_args(parser: argparse.ArgumentParser, *, fake_help: str | None = None) -> None:
    """``--server URL --server-log FILE`` (and ``--fake``, given its help)."""
    parser.add_argument("--server", help="a running trioserve, e.g. http://127.0.0.1:8080")
    parser.add_argument("--server-log", type=Path, help="its log, written with --log-level debug")
    if fake_help is not None:
        parser.add_argument("--fake", action="store_true", help=fake_help)


def check_target_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.server) != bool(args.server_log):
        parser.error("--server and --server-log go together")
    if getattr(args, "fake", False) and args.server:
        parser.error("--fake or --server, not both")


def scratch_folder(scratch: Path | None, prefix: str) -> Path:
    """``--scratch``, or a new temporary folder."""
    folder = scratch or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_target(
    stack: contextlib.ExitStack,
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    scratch: Path,
    *,
    start: Callable[..., ServerProcess],
    fake: Callable[[Path], FakeServer] | None = None,
) -> tuple[int, Path]:
    """The server's port and log: ``--server``, a ``fake(log_path)`` for ``--fake``, or
    ``start(scratch, cwd=ROOT, die_with_parent=True)``, stopped when ``stack`` closes."""
    if args.server:
        url, log_path = args.server, args.server_log
    elif fake is not None and args.fake:
        log_path = scratch / "fake.log"
        log_path.touch()
        url = stack.enter_context(fake(log_path)).url
    else:
        server = start(scratch, cwd=ROOT, die_with_parent=True)
        stack.callback(server.stop)
        url, log_path = server.url, server.log_path
    port = urlsplit(url).port
    if urlsplit(url).hostname != "127.0.0.1" or port is None:
        parser.error("--server must be http://127.0.0.1:PORT")
    return port, log_path


def finish(report: dict, scratch: Path, saved: list[str] | None = None) -> int:
    """Print the report (with the scratch folder, and the saved requests if any): the exit
    code, 0 only on a pass."""
    report["scratch"] = str(scratch)
    if saved is not None:
        report["saved"] = saved
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1
