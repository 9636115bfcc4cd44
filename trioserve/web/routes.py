"""The blueprint that serves the playground's static files.

The page holds no secret (with ``--api-key`` it asks the person for the key and sends it with
each API call), so its paths are exempt from the key: ``is_ui_path`` tells the auth check which.
A strict Content-Security-Policy keeps the page to its own origin, which is also what "works
offline, no CDN" means in practice.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory

from trioserve.api.errors import NotFound

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/static/"

# Only these kinds are served; anything else under /static/ is a 404. (Quart adds the charset.)
CONTENT_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

web = Blueprint("web", __name__)


def is_ui_path(path: str) -> bool:
    """True for the page and its files, which load before the person can give an API key."""
    return path == "/" or path.startswith(STATIC_PREFIX)


async def _send(name: str) -> Response:
    content_type = CONTENT_TYPES.get(Path(name).suffix)
    if content_type is None:
        raise NotFound(f"Unknown route: GET {STATIC_PREFIX}{name}")
    # cache_timeout=0 and no-cache: revalidate by ETag each time, so an upgrade shows at once.
    response = await send_from_directory(STATIC_DIR, name, mimetype=content_type, cache_timeout=0)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@web.get("/")
async def index() -> Response:
    response = await _send("index.html")
    response.headers["Content-Security-Policy"] = CSP
    return response


@web.get("/static/<path:name>")
async def static_file(name: str) -> Response:
    return await _send(name)
