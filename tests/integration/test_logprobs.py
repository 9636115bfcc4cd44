"""Logprobs are real log-probabilities, in OpenAI's shapes, streamed and not."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import data_objects

QUESTION = [{"role": "user", "content": "Name a French city."}]


def _check_entry(entry: dict, top_n: int, greedy: bool) -> None:
    assert entry["logprob"] <= 0
    assert isinstance(entry["token"], str) and entry["token"]
    assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    top = entry["top_logprobs"]
    assert len(top) == top_n
    values = [t["logprob"] for t in top]
    assert all(v <= 0 for v in values)
    assert values == sorted(values, reverse=True)
    chosen = [t for t in top if t["token"] == entry["token"]]
    assert chosen, f"the chosen token {entry['token']!r} is not among the top {top_n}"
    assert chosen[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)
    if greedy:
        assert entry["logprob"] == pytest.approx(values[0], abs=1e-4)


def test_chat_not_streamed(server):
    body = {
        "messages": QUESTION,
        "logprobs": True,
        "top_logprobs": 20,
        "temperature": 0,
        "max_tokens": 6,
    }
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)
    choice = r.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == r.json()["usage"]["completion_tokens"]
    for entry in entries:
        _check_entry(entry, 20, greedy=True)
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]


def test_chat_streamed_sampled(server):
    body = {
        "messages": QUESTION,
        "logprobs": True,
        "top_logprobs": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "max_tokens": 6,
        "stream": True,
    }
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)
    chunks = [c for c in data_objects(r.text) if c.get("choices")]
    entries = [
        e
        for c in chunks
        if c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == 6
    for entry in entries:
        # top_p sampling can pick a token outside the top 5, so check only what must hold.
        assert entry["logprob"] <= 0
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert entry["logprob"] <= values[0] + 1e-4


def test_chat_without_top_logprobs(server):
    body = {"messages": QUESTION, "logprobs": True, "temperature": 0, "max_tokens": 3}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3
    assert all(e["logprob"] <= 0 and e["top_logprobs"] == [] for e in entries)


def test_completions(server):
    body = {"prompt": "The capital of France is", "logprobs": 3, "temperature": 0, "max_tokens": 5}
    r = httpx.post(server.v1 + "/completions", json=body, timeout=120)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    # The text continues the prompt, leading space included (" Paris"), token by token.
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0
    for token, value, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert value <= 0 and len(top) == 3
        assert token in top and top[token] == pytest.approx(value, abs=1e-4)
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy


def test_top_logprobs_over_20_is_400(server):
    body = {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
