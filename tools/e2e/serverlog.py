"""What trioserve generated, read back from its debug log, and text comparison for clients.

With ``--log-level debug`` the server logs each finished request's generated text as
``request <id> (<answer id>) text: '<repr>'``. The answer id (``chatcmpl-...`` on the Chat
Completions API, ``resp_...`` on Responses, ``msg_...`` on Messages) is also in the stream a
client receives, so it ties a client's answer to the server's own record of it.
"""

from __future__ import annotations

import ast
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

TEXT_LINE = re.compile(r"request \S+ \((chatcmpl-[0-9A-Za-z]+)\) text: (.*)$", re.MULTILINE)
# The same line for any answer id (the Responses and Messages drivers).
ANY_TEXT_LINE = re.compile(r"request \S+ \(([^()\s]+)\) text: (.*)$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

Item = TypeVar("Item")


def logged_texts(log_text: str, line: re.Pattern[str] = TEXT_LINE) -> dict[str, str]:
    """answer id (chatcmpl ids by default) -> generated text, from the server's debug lines."""
    texts = {}
    for match in line.finditer(log_text):
        with contextlib.suppress(ValueError, SyntaxError):
            texts[match.group(1)] = ast.literal_eval(match.group(2))
    return texts


def read_back(
    server_log: Path,
    items: Sequence[Item],
    describe: Callable[[Item, dict[str, str]], dict],
    *,
    waiting: Callable[[dict], bool],
    line: re.Pattern[str] = TEXT_LINE,
    patience_s: float = 10,
) -> list[dict]:
    """``describe(item, logged_texts)`` for each item. The server writes its text line as the
    stream ends: while a description is still ``waiting`` for its line, read the log again,
    for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        texts = logged_texts(server_log.read_text(errors="replace"), line)
        described = [describe(item, texts) for item in items]
        if time.monotonic() > deadline or not any(waiting(d) for d in described):
            return described
        time.sleep(0.2)


def normalized(text: str) -> str:
    """Terminal colours dropped and whitespace runs folded, for "output contains text"."""
    return " ".join(ANSI.sub("", text).split())
