"""What keeps web pages from using a local server: the ``Host`` and ``Content-Type`` checks.

A server on 127.0.0.1 with no API key is reachable by every page the local user opens:

- **DNS rebinding.** A page on ``evil.example`` re-points that name at 127.0.0.1; its scripts
  are then same-origin with the server and read every answer (CORS does not apply). The one
  thing the browser cannot hide is the name: such requests carry ``Host: evil.example``. So,
  bound to a loopback address without a key, only loopback names are served (the fix Ollama
  made for CVE-2024-28224). With an API key the page cannot authenticate anyway; bound to
  another address the server is meant to be reached by other names. ``--allowed-hosts``
  adds names (and then always applies), ``'*'`` turns the check off.
- **Cross-origin "simple" requests.** Without a CORS preflight, a page may POST a body with
  ``Content-Type: text/plain`` (or none, or form encodings) to any origin: it cannot read the
  answer, but it can make the model generate, and our parser would not care about the type.
  A JSON content type forces a preflight, which fails unless ``--cors`` allows that origin.
  So a POST must say ``application/json`` (any parameters) or gets 415;
  ``--any-content-type`` turns this off.

Both run first in ``before_request`` (``api/app.py``), for every path: the playground too,
since a rebinding page could drive it, and ``/health``, which has nothing that a local probe
(which uses a loopback name) cannot reach. Refusals use OpenAI's error shape.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from trioserve.api.errors import ApiError

__all__ = [
    "HostNotAllowed",
    "HostPolicy",
    "UnsupportedMediaType",
    "check_json_content_type",
    "host_name",
    "is_loopback_address",
    "is_loopback_name",
]

JSON_MEDIA_TYPE = "application/json"


class HostNotAllowed(ApiError):
    """403: the request's ``Host`` is not one this server answers to."""

    status = 403
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="host_not_allowed")


class UnsupportedMediaType(ApiError):
    """415: a POST whose body is not declared ``application/json``."""

    status = 415
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unsupported_media_type")


def is_loopback_address(host: str) -> bool:
    """Whether a bind address (``--host``) is loopback only: 127.0.0.0/8, ::1, localhost."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower-cased, without the port; IPv6 keeps its brackets
    (``[::1]:8080`` → ``[::1]``). Anything malformed comes back as is and so matches nothing."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value
        rest = value[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return value
        return value[: end + 1]
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name
    return value


def is_loopback_name(name: str) -> bool:
    """Names that only ever mean this machine: ``localhost`` and ``*.localhost`` (RFC 6761;
    browsers resolve them to loopback themselves), 127.0.0.0/8 and ``[::1]``."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name.startswith("[") and name.endswith("]"):
        try:
            return ipaddress.IPv6Address(name[1:-1]).is_loopback
        except ValueError:
            return False
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which ``Host`` names to serve, from the bind address, the key and ``--allowed-hosts``.

    ``allowed`` entries are names (``proxy.example``), ``*.example.com`` for any subdomain of
    ``example.com``, or ``*`` for any Host at all; ports are ignored, case too.
    """

    def __init__(self, bind_host: str, api_key: str | None, allowed: Iterable[str] = ()) -> None:
        names = {
            host_name(a) if a != "*" and not a.startswith("*.") else a.lower() for a in allowed
        }
        self.any = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"
        self.names = frozenset(n for n in names if not n.startswith("*"))
        # The default: check only where a web page is the likely way in.
        self.active = not self.any and (
            bool(names) or (is_loopback_address(bind_host) and not api_key)
        )

    def allows(self, header: str | None) -> bool:
        if not self.active:
            return True
        if not header:  # browsers always send one; HTTP/1.0 tools may not, and are not pages
            return True
        name = host_name(header)
        return (
            is_loopback_name(name)
            or name in self.names
            or any(name.endswith(suffix) for suffix in self.suffixes)
        )

    def check(self, header: str | None) -> None:
        """Raise ``HostNotAllowed`` unless the ``Host`` header is one to serve."""
        if not self.allows(header):
            raise HostNotAllowed(
                f"Host {host_name(header or '')!r} is not allowed: this server answers only to "
                "localhost, 127.0.0.1 and [::1] (a defence against DNS rebinding). Behind a "
                "proxy, add the name with --allowed-hosts (TRIOSERVE_ALLOWED_HOSTS)."
            )


def check_json_content_type(mimetype: str) -> None:
    """Raise ``UnsupportedMediaType`` unless ``mimetype`` (the ``Content-Type`` without its
    parameters, lower-cased) is ``application/json``."""
    if mimetype != JSON_MEDIA_TYPE:
        given = f"Content-Type {mimetype!r}" if mimetype else "no Content-Type"
        raise UnsupportedMediaType(
            f"Request bodies must be JSON sent with 'Content-Type: application/json'; this "
            f"request has {given} (with curl, add -H 'Content-Type: application/json')."
        )
