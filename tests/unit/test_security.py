"""Security basics that need no server: loopback detection, key comparison, log hygiene."""

from __future__ import annotations

import pytest

from trioserve.config import ServerConfig
from trioserve.server import _is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_loopback_detection(host, loopback):
    assert _is_loopback(host) is loopback


def test_defaults_are_safe():
    config = ServerConfig()
    assert config.host == "127.0.0.1"
    assert config.max_body_bytes <= 16 * 1024 * 1024
    assert config.debug_endpoints is False
    assert config.test_faults is False
    assert config.sse_keepalive_s == 0
