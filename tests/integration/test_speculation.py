"""Speculative decoding over HTTP: Predicted Outputs' usage through the openai SDK, the
Responses dialect, and a constrained request sharing the batch with a drafting one."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.integration.test_structured_output import PERSON, PROMPT, SCHEMA_FORMAT

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER_GUESS = "The capital of France is Paris. It is known for the Eiffel Tower."


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def _plain(client) -> str:
    r = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=24, temperature=0)
    return r.choices[0].message.content


@pytest.mark.parametrize("as_parts", [False, True], ids=["string", "parts"])
def test_prediction_reports_accepted_and_rejected_tokens(client, as_parts):
    content = [{"type": "text", "text": ANSWER_GUESS}] if as_parts else ANSWER_GUESS
    r = client.chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        prediction={"type": "content", "content": content},
    )
    details = r.usage.completion_tokens_details
    assert details is not None
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    assert r.usage.completion_tokens <= 24
    # The answer is the model's own: the same as without a prediction.
    assert r.choices[0].message.content == _plain(client)


def test_prediction_usage_in_a_stream(client):
    stream = client.chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        prediction={"type": "content", "content": ANSWER_GUESS},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.accepted_prediction_tokens > 0
    assert text == _plain(client)


def test_no_prediction_no_prediction_fields(client):
    r = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, temperature=0)
    assert r.model_dump()["usage"].get("completion_tokens_details") is None


def test_prediction_in_the_responses_dialect(server):
    body = {
        "input": "What is the capital of France?",
        "max_output_tokens": 24,
        "temperature": 0,
        "store": False,
        "prediction": {"type": "content", "content": ANSWER_GUESS},
    }
    r = httpx.post(f"{server.v1}/responses", json=body, timeout=300)
    assert r.status_code == 200, r.text
    details = r.json()["usage"]["output_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0
    assert details["rejected_prediction_tokens"] >= 0


def test_a_bad_prediction_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=4,
            prediction={"type": "image", "content": "x"},
        )


def test_constrained_request_validates_beside_a_drafting_one(client):
    """json_schema with speculation asked for (it does not draft: its grammar must see each
    token), in the same batch as a request that drafts from its prediction."""

    def constrained():
        return client.chat.completions.create(
            model="m",
            messages=PROMPT,
            response_format=SCHEMA_FORMAT,
            max_tokens=80,
            temperature=0,
            extra_body={"speculation": "prompt-lookup"},
        )

    def drafting():
        return client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=40,
            temperature=0,
            prediction={"type": "content", "content": ANSWER_GUESS * 3},
        )

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(constrained), pool.submit(drafting)
        r, other = first.result(), second.result()
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert other.usage.completion_tokens_details.accepted_prediction_tokens > 0


def test_metrics_count_draft_tokens_per_method(server, client):
    client.chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        prediction={"type": "content", "content": ANSWER_GUESS},
    )
    text = httpx.get(server.url + "/metrics", timeout=30, trust_env=False).text
    values = {}
    for line in text.splitlines():
        if line.startswith("trioserve_speculative_") and 'method="prediction"' in line:
            name = line.split("{", 1)[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    proposed = values["trioserve_speculative_draft_tokens_total"]
    accepted = values["trioserve_speculative_accepted_tokens_total"]
    assert 0 < accepted <= proposed


def test_draft_model_mode_needs_a_draft_model(client):
    with pytest.raises(openai.BadRequestError, match="--draft-model") as caught:
        client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=4,
            extra_body={"speculation": "draft-model"},
        )
    assert caught.value.body["param"] == "speculation"


def test_a_draft_model_over_http(launch, model_dir):
    """``--draft-model`` (here the model itself, so its drafts are right) from the command
    line: requests draft with it by default, the answer is the model's own, and /metrics
    counts the drafts under their method."""
    server = launch("--draft-model", str(model_dir), "--speculation", "draft-model")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)

    def ask(**extra) -> str:
        r = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=24, temperature=0, extra_body=extra
        )
        return r.choices[0].message.content

    assert ask() == ask(speculation="off")
    text = httpx.get(server.url + "/metrics", timeout=30, trust_env=False).text
    accepted = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trioserve_speculative_accepted_tokens_total")
        and 'method="draft-model"' in line
    ]
    assert accepted and accepted[0] > 0, text
