"""What keeps web pages and strangers out, through the real app (Quart's test client, the
real ``before_request`` checks): the ``Host`` check against DNS rebinding, the JSON
``Content-Type`` check against cross-origin simple requests, and the API key comparison.

The app is built without its lifespan, so the engine never starts: a request that passes every
check gets the 503 "loading" answer (or a 400 from the body), which tells it apart from the
403/415/401 of a refusal.
"""

from __future__ import annotations

import pytest

from trioserve.api.app import create_app
from trioserve.api.security import HostPolicy, host_name, is_loopback_address, is_loopback_name
from trioserve.config import ServerConfig

CHAT = "/v1/chat/completions"
BODY = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
JSON = {"Content-Type": "application/json"}


# -- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_bind_address_is_loopback(host, loopback):
    assert is_loopback_address(host) is loopback


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8080", "localhost"),
        ("LOCALHOST", "localhost"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("Evil.Example:80", "evil.example"),
        ("evil.example", "evil.example"),
        ("[::1]x", "[::1]x"),  # malformed: kept whole, so it matches nothing
        ("a:b:c", "a:b:c"),
    ],
)
def test_host_name_drops_port_and_case(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("name", "loopback"),
    [
        ("localhost", True),
        ("app.localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("[::1]", True),
        ("localhost.evil.example", False),  # what a rebinding attacker can actually register
        ("127.0.0.1.evil.example", False),
        ("evil-localhost", False),
        ("localhost.", False),
        ("0.0.0.0", False),
        ("[::]", False),
        ("::1", False),  # not a valid Host: IPv6 needs brackets
        ("", False),
    ],
)
def test_loopback_names(name, loopback):
    assert is_loopback_name(name) is loopback


@pytest.mark.parametrize(
    ("bind", "key", "allowed", "active"),
    [
        ("127.0.0.1", None, (), True),  # the default: a local server with no key
        ("localhost", None, (), True),
        ("::1", None, (), True),
        ("127.0.0.1", "k", (), False),  # a page cannot authenticate anyway
        ("0.0.0.0", None, (), False),  # meant to be reached by other names
        ("0.0.0.0", "k", ("proxy.example",), True),  # a list given: always checked
        ("127.0.0.1", None, ("*",), False),
        ("127.0.0.1", None, ("proxy.example", "*"), False),
    ],
)
def test_when_the_host_check_applies(bind, key, allowed, active):
    assert HostPolicy(bind, key, allowed).active is active


def test_host_policy_matching():
    policy = HostPolicy("127.0.0.1", None, ("Proxy.Example:443", "*.corp.example"))
    for ok in ("proxy.example", "PROXY.example:8080", "a.corp.example", "b.a.corp.example:1"):
        assert policy.allows(ok), ok
    for ok in ("localhost:8080", "127.0.0.1", "[::1]:80", None, ""):
        assert policy.allows(ok), ok  # loopback names always; no Host is no browser
    for bad in ("corp.example", "evilcorp.example", "proxy.example.evil", "evil.example"):
        assert not policy.allows(bad), bad


# -- through the app --------------------------------------------------------------------------


@pytest.fixture
def client_for(model_dir):
    def make(**fields):
        return create_app(ServerConfig(model=model_dir, **fields)).test_client()

    return make


async def error_of(response) -> dict:
    body = await response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/health"),
        ("GET", "/"),  # the playground: a rebinding page could drive it
        ("GET", "/static/app.js"),
        ("GET", "/metrics"),
        ("POST", CHAT),
        ("POST", "/v1/completions"),
        ("OPTIONS", CHAT),
    ],
)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example"])
async def test_foreign_host_is_refused_everywhere(client_for, method, path, host):
    client = client_for()
    headers = {"Host": host, **JSON}
    if method == "OPTIONS":
        headers["Origin"] = "http://evil.example"
        headers["Access-Control-Request-Method"] = "POST"
    response = await client.open(path, method=method, headers=headers, data=BODY)
    assert response.status_code == 403
    error = await error_of(response)
    assert error["code"] == "host_not_allowed"
    assert error["type"] == "invalid_request_error"
    assert "--allowed-hosts" in error["message"]
    assert "evil.example" in error["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:9", "[::1]:8080"])
async def test_loopback_hosts_are_served(client_for, host):
    client = client_for()
    response = await client.get("/v1/models", headers={"Host": host})
    assert response.status_code == 200
    assert (await response.get_json())["object"] == "list"
    response = await client.post(CHAT, data=BODY, headers={"Host": host, **JSON})
    assert response.status_code == 503  # passed every check; the engine is not running


async def test_allowed_hosts_for_a_proxy(client_for):
    client = client_for(allowed_hosts=("proxy.example",))
    assert (
        await client.get("/v1/models", headers={"Host": "proxy.example:443"})
    ).status_code == 200
    assert (await client.get("/v1/models", headers={"Host": "127.0.0.1"})).status_code == 200
    assert (await client.get("/v1/models", headers={"Host": "other.example"})).status_code == 403
    anyone = client_for(allowed_hosts=("*",))
    assert (await anyone.get("/v1/models", headers={"Host": "other.example"})).status_code == 200


async def test_an_explicit_host_list_applies_with_a_key_too(client_for):
    client = client_for(api_key="k", allowed_hosts=("proxy.example",))
    auth = {"Authorization": "Bearer k"}
    ok = await client.get("/v1/models", headers={"Host": "proxy.example", **auth})
    assert ok.status_code == 200
    refused = await client.get("/v1/models", headers={"Host": "evil.example", **auth})
    assert refused.status_code == 403


async def test_no_host_check_with_a_key_or_a_public_bind(client_for):
    keyed = client_for(api_key="k")
    response = await keyed.get("/v1/models", headers={"Host": "evil.example"})
    assert response.status_code == 401  # the key check, not the Host check, answers
    public = client_for(host="0.0.0.0")
    assert (await public.get("/v1/models", headers={"Host": "10.0.0.5:8080"})).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",  # what fetch() sends for a string body: no preflight
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",  # curl -d, and HTML forms
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json-patch+json",
    ],
)
@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_post_without_json_content_type_is_415(client_for, path, content_type):
    client = client_for()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post(path, data=BODY, headers=headers)
    assert response.status_code == 415
    error = await error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_content_type_with_any_parameters_passes(client_for, content_type):
    client = client_for()
    response = await client.post(CHAT, data=BODY, headers={"Content-Type": content_type})
    assert response.status_code == 503  # through the checks, to the (stopped) engine
    bad_body = await client.post(CHAT, data=b"{}", headers={"Content-Type": content_type})
    assert bad_body.status_code == 400  # and the body is parsed as before


async def test_content_type_check_leaves_other_answers_alone(client_for):
    client = client_for()
    assert (await client.post("/v1/nowhere", data=BODY)).status_code == 404
    assert (await client.get(CHAT)).status_code == 405
    assert (await client.get("/v1/models")).status_code == 200  # GETs need no type


async def test_any_content_type_switch(client_for):
    client = client_for(require_json_content_type=False)
    response = await client.post(CHAT, data=BODY, headers={"Content-Type": "text/plain"})
    assert response.status_code == 503


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("Bearer sekret", 503),
        ("bearer sekret", 503),
        ("Bearer  sekret ", 503),
        (None, 401),
        ("Bearer nope", 401),
        ("Bearer sekre", 401),  # a prefix of the key
        ("Bearer sekret2", 401),
        ("Basic sekret", 401),
        ("sekret", 401),
        ("Bearer ", 401),
    ],
)
async def test_api_key_comparison(client_for, authorization, status):
    client = client_for(api_key="sekret")
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = await client.post(CHAT, data=BODY, headers=headers)
    assert response.status_code == status
    if status == 401:
        error = await error_of(response)
        assert error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # /health stays open to a probe without the key.
    assert (await client.get("/health")).status_code == 503


def test_defaults_are_safe():
    config = ServerConfig()
    assert config.host == "127.0.0.1"
    assert config.max_body_bytes <= 16 * 1024 * 1024
    assert config.debug_endpoints is False
    assert config.sse_keepalive_s == 0
    assert config.allowed_hosts == () and config.require_json_content_type is True
    assert HostPolicy(config.host, config.api_key, config.allowed_hosts).active


def test_the_playground_posts_json():
    # Its one POST helper declares the body JSON, so the 415 check never refuses the page.
    from trioserve.web.routes import STATIC_DIR

    script = (STATIC_DIR / "app.js").read_text()
    helper = script[script.index("async function postJSON") :]
    helper = helper[: helper.index("\n}\n")]
    assert '"Content-Type": "application/json"' in helper
    assert script.count('method: "POST"') == 1
