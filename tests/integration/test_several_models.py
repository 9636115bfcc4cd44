"""Several models in one real server: the embedded SmolLM2 (its converted float32 directory)
served under several names, each with an engine of its own. Interleaved answers, LRU
eviction, idle expiry, a client that leaves while its model loads, unknown names in both
dialects' shapes, a loaded model that never waits on another model's load, and streams that
wait for their model inside the stream (loading progress, a disconnect, a failed load).

Slow loads are deterministic: the fault-injection server (``python -m trioserve.testing.faults``)
holds a starting worker before its load while a gate file exists."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from trioserve.testing import free_port, serve_argv, start_server
from trioserve.testing.faults import LOAD_GATE_ENV
from trioserve.testing.sse import Event, SSEParser

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT_S = 120
WAIT_S = 60.0  # a bound on every poll below, never a sleep that has to be long enough
COMMON = ("--parallel", "2", "--no-ui", "--prefix-cache-mb", "0", "--debug-endpoints")


def named(model_dir: Path, *names: str) -> list[str]:
    return [arg for name in names for arg in ("--model", f"{name}={model_dir}")]


def ask(model: str, **extra) -> dict:
    return {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 16, **extra}


def launch(tmp_path_factory, *args: str, faults: bool = False, env: dict | None = None):
    port = free_port()
    argv = serve_argv(port, *args)
    if faults:  # the same command line, through the fault-injection entry point
        argv = [sys.executable, "-m", "trioserve.testing.faults", "--port", str(port), *args]
    log_path = tmp_path_factory.mktemp("several") / "server.log"
    return start_server(argv, port, log_path=log_path, env=env)


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gate") / "hold-loads"


@pytest.fixture(scope="module")
def four(tmp_path_factory, model_dir, gate):
    """a, b, c, d: room for all four, a loaded at start; loads held while ``gate`` exists."""
    args = (*named(model_dir, "a", "b", "c", "d"), "--max-loaded-models", "4", *COMMON)
    server = launch(tmp_path_factory, *args, faults=True, env={LOAD_GATE_ENV: str(gate)})
    yield server
    gate.unlink(missing_ok=True)
    server.stop()


async def statuses(client: httpx.AsyncClient, server) -> dict[str, str]:
    models = (await client.get(server.v1 + "/models")).json()["data"]
    return {m["id"]: m["status"] for m in models}


async def wait_status(client, server, model: str, status: str) -> dict[str, str]:
    deadline = time.monotonic() + WAIT_S
    while (now := await statuses(client, server))[model] != status:
        assert time.monotonic() < deadline, f"{model} never became {status}: {now}"
        await trio.sleep(0.1)
    return now


async def answer(client, server, model: str) -> str:
    response = await client.post(server.v1 + "/chat/completions", json=ask(model))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    return body["choices"][0]["message"]["content"]


async def test_two_models_answer_interleaved_requests(four):
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        answers: dict[str, str] = {}

        async def one(model: str, key: str) -> None:
            answers[key] = await answer(client, four, model)

        async with trio.open_nursery() as nursery:
            for i, model in enumerate(["a", "b", "a", "b"]):
                nursery.start_soon(one, model, f"{model}{i}")
        assert all("Paris" in text for text in answers.values()), answers
        listed = (await client.get(four.v1 + "/models")).json()["data"]
        assert [m["id"] for m in listed] == ["a", "b", "c", "d"]
        assert {m["id"]: m["status"] for m in listed} == {
            "a": "loaded",
            "b": "loaded",
            "c": "unloaded",
            "d": "unloaded",
        }
        assert all(m["object"] == "model" and m["owned_by"] == "trioserve" for m in listed)
        one_model = (await client.get(four.v1 + "/models/b")).json()
        assert one_model["id"] == "b" and one_model["status"] == "loaded"
        health = (await client.get(four.url + "/health")).json()
        assert health["status"] == "ok" and health["model"] == "a"  # the default's figures
        assert [(m["id"], m["status"]) for m in health["models"]][:2] == [
            ("a", "loaded"),
            ("b", "loaded"),
        ]
        metrics = (await client.get(four.url + "/metrics")).text
        assert 'trioserve_slots{model="b"} 2.0' in metrics
        assert 'trioserve_model_loaded{model="c"} 0.0' in metrics


async def test_an_unknown_model_is_a_404_in_each_dialects_shape(four):
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        response = await client.post(four.v1 + "/chat/completions", json=ask("zz"))
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "'a', 'b', 'c', 'd'" in error["message"]
        anthropic = await client.post(
            four.v1 + "/messages",
            json={"model": "zz", "max_tokens": 8, "messages": QUESTION},
        )
        assert anthropic.status_code == 404
        body = anthropic.json()
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        assert "'a', 'b', 'c', 'd'" in body["error"]["message"]
        missing = await client.get(four.v1 + "/models/zz")
        assert missing.status_code == 404


async def test_a_client_that_leaves_while_its_model_loads_frees_everything(four, gate):
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        gate.touch()
        try:
            with trio.move_on_after(WAIT_S) as waited:
                async with trio.open_nursery() as nursery:

                    async def stream_c() -> None:
                        body = ask("c", stream=True)
                        async with client.stream(
                            "POST", four.v1 + "/chat/completions", json=body
                        ) as response:
                            async for text in response.aiter_text():  # comments only
                                assert "data:" not in text, "data came while the model loaded"

                    nursery.start_soon(stream_c)
                    await wait_status(client, four, "c", "loading")
                    state = (await client.get(four.url + "/debug/state")).json()
                    assert state["leases"] == 0  # the waiter holds nothing yet
                    nursery.cancel_scope.cancel()  # the client hangs up before any data
            assert not waited.cancelled_caught
        finally:
            gate.unlink(missing_ok=True)
        await wait_status(client, four, "c", "loaded")  # the load was the pool's: it went on
        state = (await client.get(four.url + "/debug/state")).json()
        assert state["leases"] == 0 and state["slots_busy"] == 0 and state["requests"] == []
        assert "Paris" in await answer(client, four, "c")


async def test_a_loaded_model_never_waits_on_another_models_load(four, gate):
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        assert "Paris" in await answer(client, four, "a")  # loaded, before the gate
        gate.touch()
        try:
            async with trio.open_nursery() as nursery:
                answers: list[str] = []

                async def ask_d() -> None:
                    answers.append(await answer(client, four, "d"))

                nursery.start_soon(ask_d)
                await wait_status(client, four, "d", "loading")
                assert "Paris" in await answer(client, four, "a")
                assert (await statuses(client, four))["d"] == "loading"  # still held
                gate.unlink()
        finally:
            gate.unlink(missing_ok=True)
        assert answers and "Paris" in answers[0]


async def test_one_loaded_model_at_a_time_unloads_the_least_recently_used(
    tmp_path_factory, model_dir
):
    args = (*named(model_dir, "a", "b"), "--max-loaded-models", "1", *COMMON)
    server = launch(tmp_path_factory, *args)
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            await wait_status(client, server, "a", "loaded")
            assert "Paris" in await answer(client, server, "b")
            assert await statuses(client, server) == {"a": "unloaded", "b": "loaded"}
            health = (await client.get(server.url + "/health")).json()
            assert {m["id"]: m["status"] for m in health["models"]} == {
                "a": "unloaded",
                "b": "loaded",
            }
            assert "Paris" in await answer(client, server, "a")  # loaded again
            assert await statuses(client, server) == {"a": "loaded", "b": "unloaded"}
            state = (await client.get(server.url + "/debug/state")).json()
            assert state["leases"] == 0
            assert [m["engine"] for m in state["models"]] == [True, False]
        assert "unloading model a to make room for b" in server.log_text()
    finally:
        server.stop()


async def test_an_idle_model_is_unloaded_after_the_ttl(tmp_path_factory, model_dir):
    args = (*named(model_dir, "a", "b"), "--max-loaded-models", "2", "--model-ttl", "2")
    server = launch(tmp_path_factory, *args, *COMMON)
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            assert "Paris" in await answer(client, server, "a")
            await wait_status(client, server, "a", "unloaded")
            assert "after 2 s idle" in server.log_text()
            assert "Paris" in await answer(client, server, "a")  # and back on demand
    finally:
        server.stop()


PROGRESS = {"X-SwiftLM-Prefill-Progress": "true"}


@pytest.fixture(scope="module")
def waiting(tmp_path_factory, model_dir):
    """a loaded at start; p, q, r, s loaded on demand while ``hold`` allows; ``bad`` never
    loads (its source does not exist). Heartbeats every 0.2 s."""
    hold = tmp_path_factory.mktemp("gate") / "hold-loads"
    args = (
        *named(model_dir, "a", "p", "q", "r", "s"),
        "--model",
        "bad=/nonexistent/model",
        "--max-loaded-models",
        "6",
        "--heartbeat-interval",
        "0.2",
        *COMMON,
    )
    server = launch(tmp_path_factory, *args, faults=True, env={LOAD_GATE_ENV: str(hold)})
    server.hold = hold
    yield server
    hold.unlink(missing_ok=True)
    server.stop()


class Reader:
    """A response's SSE events, read in parts: ``read(until)`` stops after the first event
    ``until`` accepts; the next ``read`` goes on from there."""

    def __init__(self, response: httpx.Response) -> None:
        self._texts = response.aiter_text()
        self._parser = SSEParser()
        self._pending: list[Event] = []

    async def read(self, until=None) -> list[Event]:
        events: list[Event] = []
        while True:
            while self._pending:
                events.append(event := self._pending.pop(0))
                if until is not None and until(event):
                    return events
            try:
                text = await anext(self._texts)
            except StopAsyncIteration:
                return events
            self._pending += self._parser.feed(text)


def is_loading(event: Event) -> bool:
    return event.name == "prefill_progress" and json.loads(event.data)["status"] == "loading"


async def test_a_stream_waiting_for_its_model_gets_loading_progress_then_the_answer(waiting):
    url = waiting.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        waiting.hold.touch()
        try:
            body = ask("p", stream=True)
            async with client.stream("POST", url, json=body, headers=PROGRESS) as response:
                assert response.status_code == 200  # the headers, while p still loads
                reader = Reader(response)
                before = await reader.read(until=is_loading)
                assert (await statuses(client, waiting))["p"] == "loading"
                waiting.hold.unlink()
                after = await reader.read()
        finally:
            waiting.hold.unlink(missing_ok=True)
    events = before + after
    loading = [json.loads(e.data) for e in events if e.name == "prefill_progress"]
    loading = [p for p in loading if p["status"] == "loading"]
    for chunk in loading:  # valid chunks a strict client reads past
        assert chunk["object"] == "chat.completion.chunk" and chunk["choices"] == []
        assert chunk["model"] == "p" and chunk["elapsed_seconds"] >= 0
    data = [e.data for e in events if e.name is None and e.data is not None]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text


async def test_without_the_header_a_waiting_stream_sends_only_comments_before_data(waiting):
    url = waiting.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        waiting.hold.touch()
        try:
            async with client.stream("POST", url, json=ask("r", stream=True)) as response:
                assert response.status_code == 200
                reader = Reader(response)
                before = await reader.read(until=lambda e: e.data is None)
                waiting.hold.unlink()
                after = await reader.read()
        finally:
            waiting.hold.unlink(missing_ok=True)
    events = before + after
    assert all(e.name is None for e in events)  # strict clients: no named events at all
    first_data = next(i for i, e in enumerate(events) if e.data is not None)
    assert first_data >= 1 and all(e.data is None and e.comments for e in events[:first_data])
    data = [e.data for e in events if e.data is not None]
    assert data[-1] == "[DONE]"
    assert all(isinstance(json.loads(d), dict) for d in data[:-1])


async def test_on_messages_a_waiting_stream_pings_before_message_start(waiting):
    body = {"model": "q", "max_tokens": 16, "messages": QUESTION, "stream": True}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        waiting.hold.touch()
        try:
            async with client.stream(
                "POST", waiting.v1 + "/messages", json=body, headers=PROGRESS
            ) as response:
                assert response.status_code == 200
                reader = Reader(response)
                before = await reader.read(until=lambda e: e.name == "ping")
                waiting.hold.unlink()
                after = await reader.read()
        finally:
            waiting.hold.unlink(missing_ok=True)
    names = [e.name for e in before + after if e.data is not None]
    start = names.index("message_start")
    assert start >= 1 and set(names[:start]) == {"ping"}  # progress only after message_start
    assert names[-1] == "message_stop"
    message_start = json.loads(next(e.data for e in after if e.name == "message_start"))
    assert message_start["message"]["usage"]["input_tokens"] > 0  # the real prompt's size


async def test_a_client_that_leaves_a_waiting_stream_leaves_no_lease(waiting):
    url = waiting.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        waiting.hold.touch()
        try:
            with trio.move_on_after(WAIT_S) as waited:
                body = ask("s", stream=True)
                async with client.stream("POST", url, json=body, headers=PROGRESS) as response:
                    assert response.status_code == 200
                    await Reader(response).read(until=is_loading)
                # hung up: the stream's scope is cancelled, with the wait for the lease
            assert not waited.cancelled_caught
            deadline = time.monotonic() + WAIT_S
            while (await client.get(waiting.url + "/debug/state")).json()["leases"]:
                assert time.monotonic() < deadline, "a lease stayed after the client left"
                await trio.sleep(0.1)
            assert (await statuses(client, waiting))["s"] == "loading"  # the pool's load goes on
        finally:
            waiting.hold.unlink(missing_ok=True)
        await wait_status(client, waiting, "s", "loaded")
        state = (await client.get(waiting.url + "/debug/state")).json()
        assert state["leases"] == 0 and state["requests"] == []
        assert "Paris" in await answer(client, waiting, "s")


async def test_a_model_that_fails_while_a_stream_waits_ends_it_with_an_error_frame(waiting):
    url = waiting.v1 + "/chat/completions"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        async with client.stream("POST", url, json=ask("bad", stream=True)) as response:
            assert response.status_code == 200  # it was unloaded: the stream waited for it
            events = await Reader(response).read()
        data = [e.data for e in events if e.data is not None]
        assert data[-1] == "[DONE]" and len(data) == 2
        error = json.loads(data[0])["error"]
        assert error["code"] == "model_failed" and "'bad'" in error["message"]
        # Now known failed: the next request's answer is an HTTP error, before any stream.
        again = await client.post(url, json=ask("bad", stream=True))
        assert again.status_code == 503 and again.json()["error"]["code"] == "model_failed"
        assert "Paris" in await answer(client, waiting, "a")  # the others go on
