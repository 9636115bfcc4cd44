"""Faults at the real worker's seams, through HTTP, on the Hypercorn factory launch.

The server is ``hypercorn 'trioserve.testing.faults:create_app()'``: the production app and
worker, with the component a request's id names (``fault-<kind>``) swapped for one that
raises where a real fault would (see ``trioserve.testing.faults``). Each per-request fault
ends that request with an error and leaves the engine serving the next one, ``/health``
showing no busy slot. A native panic ends the engine: the factory launch then answers 503
with the cause (a supervisor restarts it), while ``trioserve serve`` exits with status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.integration.conftest import data_objects, parse_sse
from tests.integration.test_disconnect import wait_slots_free
from trioserve.testing import ServerProcess, free_port, hypercorn_argv, start_server

FACTORY = "trioserve.testing.faults:create_app()"


def _factory_server(tmp_path_factory, **env: str) -> ServerProcess:
    port = free_port()
    log_path = tmp_path_factory.mktemp("faulty") / "server.log"
    argv = hypercorn_argv(port, FACTORY)
    defaults = {"TRIOSERVE_PARALLEL": "2", "TRIOSERVE_PREFIX_CACHE_MB": "32"}
    return start_server(argv, port, log_path=log_path, env={**defaults, **env})


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, model_dir) -> Iterator[ServerProcess]:
    server = _factory_server(tmp_path_factory)
    yield server
    server.stop()


def _chat(content: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 24}
    return {**body, "temperature": 0, **extra}


async def _stream(client: httpx.AsyncClient, url: str, body: dict, request_id: str) -> str:
    headers = {"X-Request-Id": request_id}
    async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        return (await r.aread()).decode()


@pytest.mark.parametrize("kind", ["prefill", "decode", "detokenizer", "sampler"])
async def test_a_fault_at_a_real_seam_fails_only_that_stream(faulty, kind):
    url = faulty.v1 + "/chat/completions"
    sampling = {"temperature": 0.8, "seed": 5} if kind == "sampler" else {}
    results: dict[str, str] = {}
    with trio.fail_after(180):
        async with httpx.AsyncClient(timeout=120) as client:

            async def run(name: str, body: dict, request_id: str) -> None:
                results[name] = await _stream(client, url, body, request_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    run, "bad", _chat("Tell me a story.", **sampling), f"it-fault-{kind}"
                )
                nursery.start_soon(run, "good", _chat("Count from 1 to 10."), f"it-good-{kind}")
    bad = parse_sse(results["bad"])
    assert bad[-1] == (None, "[DONE]") and [d for _, d in bad].count("[DONE]") == 1
    error = json.loads(bad[-2][1])["error"]
    assert error["code"] == "generation_failed"
    assert "InjectedFault" in error["message"]
    good = data_objects(results["good"])
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in good)
    assert not any("error" in c for c in good)
    await wait_slots_free(faulty, within_s=30)
    assert f"request it-fault-{kind} failed" in faulty.log_text()


async def test_a_fault_in_a_whole_answer_is_a_500_and_the_next_request_is_answered(faulty):
    url = faulty.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            url, json=_chat("Say hi."), headers={"X-Request-Id": "it-fault-decode-plain"}
        )
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "generation_failed"
        after = await client.post(url, json=_chat("What is the capital of France?"))
    assert after.status_code == 200
    assert "Paris" in after.json()["choices"][0]["message"]["content"]
    await wait_slots_free(faulty, within_s=30)


async def test_a_failing_prefix_cache_store_still_delivers_the_answer(faulty):
    url = faulty.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            url, json=_chat("Name a colour."), headers={"X-Request-Id": "it-fault-cache-store"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    await wait_slots_free(faulty, within_s=30)


async def test_a_native_panic_leaves_the_factory_launch_answering_503_with_the_cause(
    tmp_path_factory, model_dir
):
    server = _factory_server(tmp_path_factory, TRIOSERVE_PARALLEL="1")
    try:
        url = server.v1 + "/chat/completions"
        with trio.fail_after(180):
            async with httpx.AsyncClient(timeout=120) as client:
                raw = await _stream(client, url, _chat("Tell me a story."), "it-fault-crash")
                events = parse_sse(raw)
                assert events[-1] == (None, "[DONE]")
                error = json.loads(events[-2][1])["error"]
                assert "SimulatedPanic" in error["message"]
                health = await client.get(server.url + "/health")
                later = await client.post(url, json=_chat("Hi."))
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "error" and "SimulatedPanic" in body["error"]
        assert "Exceptions from Trio nursery" not in body["error"]
        assert body["slots_busy"] == 0 and body["queue_length"] == 0
        assert later.status_code == 503 and "SimulatedPanic" in later.json()["error"]["message"]
        assert server.process.poll() is None  # the factory launch stays up (documented)
    finally:
        server.stop()


async def test_after_a_native_panic_trioserve_serve_exits_1_naming_the_cause(tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    argv = [sys.executable, "-m", "trioserve.testing.faults", "--port", str(port)]
    server = start_server([*argv, "--parallel", "1"], port, log_path=log_path)
    try:
        with trio.fail_after(180):
            async with httpx.AsyncClient(timeout=120) as client:
                raw = await _stream(
                    client, server.v1 + "/chat/completions", _chat("Hi."), "it-fault-crash"
                )
            assert "SimulatedPanic" in raw
        # The process ends on its own (the engine failure shuts the server down).
        returncode = await trio.to_thread.run_sync(lambda: server.process.wait(timeout=60))
        assert returncode == 1
        exit_line = [line for line in server.log_text().splitlines() if "exiting:" in line]
        assert exit_line and "SimulatedPanic" in exit_line[-1]
        assert "Exceptions from Trio nursery" not in exit_line[-1]
    finally:
        server.stop()
