"""The playground's plumbing without a server: which paths skip the API key, the ``ui``
switch from the command line and the environment, and that the page needs nothing but its
own files (no CDN: every reference is a local file that exists)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trioserve.cli import _serve_config, build_parser
from trioserve.config import ServerConfig
from trioserve.web.routes import CONTENT_TYPES, STATIC_DIR, is_ui_path


@pytest.mark.parametrize(
    ("path", "public"),
    [
        ("/", True),
        ("/static/app.js", True),
        ("/static/", True),
        ("/v1/models", False),
        ("/v1/chat/completions", False),
        ("/staticfile", False),
        ("//", False),
    ],
)
def test_is_ui_path(path: str, public: bool) -> None:
    assert is_ui_path(path) is public


def test_ui_switch_from_cli_and_env() -> None:
    parser = build_parser()
    assert _serve_config(parser.parse_args(["serve"]), Path(".")).ui is True
    assert _serve_config(parser.parse_args(["serve", "--no-ui"]), Path(".")).ui is False
    assert ServerConfig().ui is True
    assert ServerConfig.from_env({"TRIOSERVE_UI": "0"}).ui is False
    assert ServerConfig.from_env({"TRIOSERVE_UI": "false"}).ui is False
    assert ServerConfig.from_env({"TRIOSERVE_UI": "1"}).ui is True


def test_page_references_only_its_own_files() -> None:
    files = {p.name for p in STATIC_DIR.iterdir()}
    assert {"index.html", "style.css", "app.js"} <= files
    assert all(Path(name).suffix in CONTENT_TYPES for name in files)
    index = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("/static/"), ref
        assert (STATIC_DIR / ref.removeprefix("/static/")).is_file(), ref
    for name in files:
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://", text), f"{name} names an external URL"
