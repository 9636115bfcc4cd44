"""Every request is bounded by the context: prompt plus output never exceeds ``--ctx-size``."""

from __future__ import annotations

import httpx

CTX = 96


async def test_max_tokens_is_clamped_to_the_context_left_after_the_prompt(launch):
    server = launch("--parallel", "1", "--ctx-size", str(CTX))
    body = {
        "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
        "max_tokens": 100_000,
        "temperature": 0,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(server.v1 + "/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    # A long story outgrows the room left (about 60 tokens): clamped there, not refused.
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CTX
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_a_prompt_that_fills_the_context_is_a_400(launch):
    server = launch("--parallel", "1", "--ctx-size", str(CTX))
    body = {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 5}
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(server.v1 + "/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(CTX) in error["message"]
