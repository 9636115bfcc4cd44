"""``<think>`` reasoning comes back apart from the answer (``--chat-template`` fixture).

tests/fixtures/think_chatml.jinja is ChatML whose assistant turn opens a ``<think>`` block,
as reasoning-model templates do. With one worked example the embedded model closes the block
itself and then answers (greedy, so deterministically).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

THINK_TEMPLATE = Path(__file__).parent.parent / "fixtures" / "think_chatml.jinja"
MESSAGES = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo plus two is four.\n</think>\nThe answer is 4."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def client(launch):
    server = launch("--parallel", "2", "--chat-template", str(THINK_TEMPLATE))
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def test_reasoning_not_streamed(client):
    r = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=40)
    message = r.choices[0].message.model_dump()
    assert "Paris" in message["reasoning_content"]
    assert "Paris" in message["content"]
    for part in (message["reasoning_content"], message["content"]):
        assert "<think>" not in part and "</think>" not in part


def test_reasoning_streamed(client):
    reasoning, content, order = "", "", []
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, temperature=0, max_tokens=40, stream=True
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.model_dump()
        if delta.get("reasoning_content"):
            reasoning += delta["reasoning_content"]
            order.append("reasoning")
        if delta.get("content"):
            content += delta["content"]
            order.append("content")
    assert "Paris" in reasoning and "Paris" in content
    assert "think>" not in reasoning + content
    assert order.index("content") > max(i for i, k in enumerate(order) if k == "reasoning")
