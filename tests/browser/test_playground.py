"""The playground at ``/`` in a real browser, against a live server on the embedded model.

What a person would check by hand: the prefill progress bar moves before the answer, the answer
streams in, Stop frees the server's slot at once, the API key is asked for once. The page's DOM
is watched by a MutationObserver installed before the page's own script runs, so what is
asserted is what was shown, not what the page says about itself.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

# Small prefill chunks and frequent heartbeats: a long prompt shows many progress values.
UI_ARGS = ("--parallel", "2", "--prefill-step-size", "16", "--heartbeat-interval", "0.3")
API_KEY = "playground-test-key"
ANSWER_TIMEOUT_S = 180
LONG_PROMPT = (
    "Here are my notes on rivers. The Nile flows north through eleven countries. "
    "The Amazon carries more water than any other river. The Danube crosses ten countries. "
) * 5 + "In one sentence, which river carries the most water?"

# Records, in order, every progress value and every change of an answer's text.
WATCH_DOM = """
window.__seen = [];
new MutationObserver((mutations) => {
  for (const m of mutations) {
    const el = m.target.nodeType === Node.TEXT_NODE ? m.target.parentElement : m.target;
    if (m.type === "attributes" && el.classList.contains("progress")) {
      window.__seen.push(["progress", Number(el.getAttribute("aria-valuenow"))]);
    } else if (el && el.matches && el.matches(".message[data-role=assistant] .content")) {
      if (el.textContent) window.__seen.push(["text", el.textContent.length]);
    }
  }
}).observe(document, {
  subtree: true, childList: true, characterData: true,
  attributes: true, attributeFilter: ["aria-valuenow"],
});
"""
COUNT_KEY_DIALOGS = """
window.__keyDialogs = 0;
const showModal = HTMLDialogElement.prototype.showModal;
HTMLDialogElement.prototype.showModal = function () {
  window.__keyDialogs += 1;
  return showModal.call(this);
};
"""


@pytest.fixture(scope="module")
def ui_server(launch):
    return launch(*UI_ARGS)


@pytest.fixture
def page(browser, ui_server):
    """A fresh tab (own sessionStorage) on the playground, with the DOM watcher installed."""
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    tab.add_init_script(WATCH_DOM)
    tab.requests = []  # every URL the page asked for: all must be the server's
    tab.on("request", lambda r: tab.requests.append(r))
    tab.goto(ui_server.url + "/")
    tab.wait_for_selector("body[data-ready=true]")
    yield tab
    context.close()


def _set_controls(page, *, temperature: str, max_tokens: str, system: str = "") -> None:
    page.fill("#system", system)
    page.eval_on_selector(
        "#temperature",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
        temperature,
    )
    page.fill("#max-tokens", max_tokens)


def _send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def _wait_until(page, expression: str, timeout_s: float) -> None:
    """Poll a JS expression (page.wait_for_function evals, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            shown = page.locator(".messages").inner_text()
            raise AssertionError(f"timed out waiting for: {expression}\npage shows:\n{shown}")
        time.sleep(0.05)


LAST_ANSWER = "[...document.querySelectorAll('.message[data-role=assistant]')].pop()"


def _wait_answer(page, count: int) -> None:
    """Wait until the page shows ``count`` answers and the last one ended; it must be done."""
    final = "['done', 'error', 'stopped']"
    _wait_until(
        page,
        f"document.querySelectorAll('.message[data-role=assistant]').length === {count}"
        f" && {final}.includes({LAST_ANSWER}.dataset.state)",
        ANSWER_TIMEOUT_S,
    )
    last = page.locator(".message[data-role=assistant]").last
    assert last.get_attribute("data-state") == "done", last.inner_text()


def _health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=5).json()


def test_progress_bar_moves_then_answer_streams(page, ui_server, tmp_path):
    _set_controls(page, temperature="0", max_tokens="32", system="You are a concise assistant.")
    _send(page, LONG_PROMPT)
    docs_shot = os.environ.get("TRIOSERVE_PLAYGROUND_SCREENSHOT")
    if docs_shot:  # e.g. docs/playground.png: the bar mid-prompt, refreshed only on purpose
        _wait_until(
            page,
            f"({LAST_ANSWER}.dataset.state === 'prefill'"
            f" && Math.abs({LAST_ANSWER}.querySelector('.progress').ariaValueNow - 60) <= 30"
            " && document.getElementById('stat-slots').textContent.startsWith('1'))"
            f" || !['waiting', 'queued', 'prefill'].includes({LAST_ANSWER}.dataset.state)",
            ANSWER_TIMEOUT_S,
        )
        page.screenshot(path=docs_shot)
    answer = page.locator(".message[data-role=assistant]").last
    _wait_answer(page, 1)

    seen = page.evaluate("window.__seen")
    first_text = next(i for i, (kind, _) in enumerate(seen) if kind == "text")
    shown = [value for kind, value in seen[:first_text] if kind == "progress"]
    distinct = [v for i, v in enumerate(shown) if i == 0 or v != shown[i - 1]]
    assert len(set(distinct)) >= 2, f"progress values before the first token: {shown}"
    assert distinct == sorted(distinct), f"progress went backwards: {distinct}"
    assert distinct[-1] == 100, f"the last progress value is not 100%: {distinct}"
    assert not any(kind == "progress" for kind, _ in seen[first_text:]), seen
    # The page's own record agrees with what was observed.
    history = answer.locator(".progress").get_attribute("data-history")
    assert [float(v) for v in history.split(",")] == distinct

    text = answer.locator(".content").inner_text()
    assert len(text.strip()) > 0
    meta = answer.locator(".meta").inner_text()
    assert "TTFT" in meta and "tok/s" in meta and "tokens" in meta, meta
    assert int(answer.get_attribute("data-ttft-ms")) > 0
    assert page.inner_text("#stat-tps") != "—"
    assert page.inner_text("#stat-slots").endswith("/ 2")

    # The request carried the controls and asked for progress events.
    posts = [r for r in page.requests if r.method == "POST"]
    assert len(posts) == 1
    body = posts[0].post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 32
    assert body["messages"][0] == {"role": "system", "content": "You are a concise assistant."}
    assert body["messages"][-1] == {"role": "user", "content": LONG_PROMPT}
    assert posts[0].headers["x-swiftlm-prefill-progress"] == "true"
    # Offline by construction: nothing but the server itself was asked for anything.
    assert all(r.url.startswith(ui_server.url + "/") for r in page.requests), [
        r.url for r in page.requests
    ]

    # The conversation is kept: a second turn sends the first one back.
    _set_controls(page, temperature="0", max_tokens="8")
    _send(page, "Thanks!")
    _wait_answer(page, 2)
    second = [r for r in page.requests if r.method == "POST"][1].post_data_json["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == text

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_stop_frees_the_slot_within_one_second(page, ui_server):
    _set_controls(page, temperature="0", max_tokens="1000")
    _send(page, "Count from 1 to 1000, one number per line.")
    _wait_until(
        page,
        f"{LAST_ANSWER}.dataset.state === 'generating'"
        f" && {LAST_ANSWER}.querySelector('.content').textContent.length >= 20",
        ANSWER_TIMEOUT_S,
    )
    assert _health(ui_server)["slots_busy"] == 1
    # The status panel shows a live tokens/s: the server's from /metrics where it has the
    # counter, else the rate this tab measures from its own stream.
    metrics = httpx.get(ui_server.url + "/metrics", timeout=5)
    source = "(server)" if "trioserve_generated_tokens_total" in metrics.text else "(this tab)"
    _wait_until(
        page,
        f"document.getElementById('tps-source').textContent === '{source}'"
        " && Number(document.getElementById('stat-tps').textContent) > 0",
        10,
    )

    page.click("#stop")
    stopped_at = time.monotonic()
    while _health(ui_server)["slots_busy"] != 0:
        assert time.monotonic() - stopped_at < 1.0, "the slot was still busy 1 s after Stop"
        time.sleep(0.05)
    freed_s = time.monotonic() - stopped_at
    print(f"slot freed {freed_s * 1000:.0f} ms after Stop")

    answer = page.locator(".message[data-role=assistant]").last
    page.wait_for_selector(".message[data-role=assistant][data-state=stopped]", timeout=5_000)
    assert "stopped" in answer.locator(".meta").inner_text()
    assert page.is_visible("#send") and not page.is_visible("#stop")


def test_api_key_is_asked_once_and_kept_for_the_tab(browser, launch):
    server = launch("--parallel", "1", "--api-key", API_KEY)
    context = browser.new_context()
    context.set_default_timeout(30_000)
    try:
        tab = context.new_page()
        tab.add_init_script(COUNT_KEY_DIALOGS)
        posts = []
        tab.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
        tab.goto(server.url + "/")  # the page itself needs no key
        tab.wait_for_selector("body[data-ready=true]")
        _set_controls(tab, temperature="0", max_tokens="8")

        _send(tab, "Hello")
        tab.wait_for_selector("#key-dialog[open]")
        tab.fill("#key-input", "a-wrong-key")
        tab.click("#key-form button[type=submit]")
        tab.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
        tab.fill("#key-input", API_KEY)
        tab.click("#key-form button[type=submit]")
        _wait_answer(tab, 1)
        assert tab.evaluate("sessionStorage.getItem('trioserve.apiKey')") == API_KEY

        _send(tab, "Hello again")
        _wait_answer(tab, 2)
        assert not tab.is_visible("#key-dialog")
        # Asked twice for the first message (a wrong key, then the right one), never after.
        assert tab.evaluate("window.__keyDialogs") == 2
        assert "authorization" not in posts[0].headers
        assert posts[-1].headers["authorization"] == f"Bearer {API_KEY}"
    finally:
        context.close()


SSE_CASES = r"""
async () => {
  const { sseEvents } = await import("/static/sse.js");
  const parse = async (pieces) => {
    const encoder = new TextEncoder();
    const body = new ReadableStream({
      start(c) {
        for (const p of pieces) c.enqueue(typeof p === "string" ? encoder.encode(p) : p);
        c.close();
      },
    });
    const out = [];
    for await (const e of sseEvents(body)) out.push([e.event, e.data]);
    return out;
  };
  return {
    split: await parse(["da", "ta: {\"a\"", ":1}\n", "\nevent: prefill_progress\ndata: x\n\n"]),
    crlf: await parse([": keepalive 1/9\r\n\r\ndata: a\r\ndata: b\r", "\n\r\n"]),
    unterminated: await parse(["data: done\n\ndata: cut"]),
    // "data: é\n\n" with the two bytes of "é" in two reads
    utf8: await parse([Uint8Array.of(100, 97, 116, 97, 58, 32, 0xc3), Uint8Array.of(0xa9, 10, 10)]),
  };
}
"""


def test_sse_parser_edge_cases(browser, ui_server):
    """The page's parser on what a network may do: events split anywhere, CRLF, comments,
    an unterminated last event, a UTF-8 character split between reads."""
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.goto(ui_server.url + "/")
        got = tab.evaluate(SSE_CASES)
    finally:
        context.close()
    assert got["split"] == [["message", '{"a":1}'], ["prefill_progress", "x"]]
    assert got["crlf"] == [["message", "a\nb"]]
    assert got["unterminated"] == [["message", "done"]]
    assert got["utf8"] == [["message", "é"]]


# Plain HTTP: no browser needed.


def test_root_serves_the_page_and_its_files(ui_server):
    page = httpx.get(ui_server.url + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path, kind in [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")]:
        response = httpx.get(ui_server.url + path, timeout=10)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind), path
        assert len(response.content) > 1000, path
    missing = httpx.get(ui_server.url + "/static/nothing.js", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    escape = httpx.get(ui_server.url + "/static/..%2Froutes.py", timeout=10)
    assert escape.status_code == 404


def test_the_page_needs_no_key_but_the_api_does(launch):
    server = launch("--parallel", "1", "--api-key", API_KEY)
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    assert httpx.get(server.url + "/static/app.js", timeout=10).status_code == 200
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401


def test_no_ui_turns_the_page_off(launch):
    server = launch("--parallel", "1", "--no-ui")
    for path in ("/", "/static/app.js"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_the_model_picker_lists_every_model_and_sends_the_pick(browser, launch, model_dir):
    server = launch("--model", f"a={model_dir}", "--model", f"b={model_dir}", *UI_ARGS)
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    try:
        tab = context.new_page()
        posts = []
        tab.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
        tab.goto(server.url + "/")
        tab.wait_for_selector("body[data-ready=true]")
        options = "[...document.querySelectorAll('#model option')].map(o => o.textContent)"
        _wait_until(tab, f"{options}.join() === 'a (loaded),b (unloaded)'", 60)
        tab.select_option("#model", "b")
        _set_controls(tab, temperature="0", max_tokens="16")
        _send(tab, "What is the capital of France?")
        _wait_answer(tab, 1)
        assert posts[0].post_data_json["model"] == "b"
        answer = tab.locator(".message[data-role=assistant]").last.locator(".content")
        assert "Paris" in answer.inner_text()
        _wait_until(tab, f"{options}.join() === 'a (unloaded),b (loaded)'", 10)  # max 1 loaded
        assert tab.inner_text("#model-name") == "b"
    finally:
        context.close()
