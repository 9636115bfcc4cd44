"""``response_format`` by constrained decoding: the real model's output parses and validates.

The schema bounds its strings (``maxLength``/``enum``), so even greedy decoding of a tiny model
finishes well inside ``max_tokens`` and every answer must be complete JSON.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import data_objects

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Rome"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
    },
    "required": ["name", "age", "city", "pets"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
PROMPT = [{"role": "user", "content": "Describe a person who lives in Europe, as JSON."}]
SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_json_schema_not_streamed(client, sampling):
    r = client.chat.completions.create(
        model="m", messages=PROMPT, response_format=SCHEMA_FORMAT, max_tokens=80, **sampling
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_json_schema_streamed(server, sampling):
    body = {
        "messages": PROMPT,
        "response_format": SCHEMA_FORMAT,
        "max_tokens": 80,
        "stream": True,
        **sampling,
    }
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=300)
    assert r.status_code == 200
    chunks = [c for c in data_objects(r.text) if c.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=40,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "response_format, reason",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "nope"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
            },
            "missing",
        ),
        ({"type": "yaml"}, "yaml"),
    ],
)
def test_schema_that_cannot_compile_is_400_with_the_reason(server, response_format, reason):
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={"messages": PROMPT, "response_format": response_format},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and reason in error["message"]
