"""What trioserve generated, read back from its debug log, and text comparison for clients.

With ``--log-level debug`` the server logs each finished request's generated text as
``request <id> (<chatcmpl-id>) text: '<repr>'``. The ``chatcmpl-`` id is also in every chunk a
client receives, so it ties a client's answer to the server's own record of it.
"""

from __future__ import annotations

import ast
import contextlib
import re

TEXT_LINE = re.compile(r"request \S+ \((chatcmpl-[0-9A-Za-z]+)\) text: (.*)$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def logged_texts(log_text: str) -> dict[str, str]:
    """chatcmpl id -> generated text, from the server's debug lines."""
    texts = {}
    for match in TEXT_LINE.finditer(log_text):
        with contextlib.suppress(ValueError, SyntaxError):
            texts[match.group(1)] = ast.literal_eval(match.group(2))
    return texts


def normalized(text: str) -> str:
    """Terminal colours dropped and whitespace runs folded, for "output contains text"."""
    return " ".join(ANSI.sub("", text).split())
