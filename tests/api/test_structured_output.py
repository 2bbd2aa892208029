"""Structured output over HTTP on the tiny random zoo: response_format, vLLM's guided_* fields, the openai SDK's
`parse`, mixed batches and the 400s. Random weights are fine: the grammar alone makes the output valid."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest

SHORT = {"type": "string", "maxLength": 8}
SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"a": {"type": "integer"}, "b": SHORT}, "required": ["a", "b"]},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "boolean": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "number": {
        "type": "object",
        "properties": {"x": {"type": "number"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x", "n"],
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "age"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "const_and_anyof": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "v": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}},
        "required": ["kind", "v"],
    },
    "top_level_array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4},
    "refs": {
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"],
    },
}


def closed(schema):
    """The schema with every object closed (`additionalProperties: false`, as OpenAI's strict mode asks): a
    random model given room for extra properties rarely finishes; json_object covers open objects."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out


SCHEMAS = {name: closed(schema) for name, schema in SCHEMAS.items()}


def completion(client, body: dict) -> dict:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def stopped_outputs(client, body: dict, seeds=(0, 1, 2, 3)) -> list[str]:
    """Texts of the runs that ended with "stop" (the grammar completed), over a few seeds."""
    texts = []
    for seed in seeds:
        choice = completion(client, {"max_tokens": 160, "temperature": 1.0, "seed": seed, **body})
        assert choice["finish_reason"] in ("stop", "length")
        if choice["finish_reason"] == "stop":
            texts.append(choice["text"])
    assert texts, f"no run of {body} ended before max_tokens"
    return texts


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_parse_and_validate(server, name):
    schema = SCHEMAS[name]
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}
    with server.client() as client:
        for text in stopped_outputs(client, body):
            jsonschema.validate(json.loads(text), schema)


def test_chat_json_schema_and_guided_json_string(server):
    schema = SCHEMAS["nested"]
    with server.client() as client:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 160, "seed": 5}
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": schema, "strict": True},
        }
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        for text in stopped_outputs(client, {"guided_json": json.dumps(schema)}):
            jsonschema.validate(json.loads(text), schema)


def test_json_object_choice_and_regex(server):
    with server.client() as client:
        for text in stopped_outputs(client, {"response_format": {"type": "json_object"}}, seeds=range(8)):
            assert isinstance(json.loads(text), dict)
        choices = ["positive", "negative", "neutral"]
        for text in stopped_outputs(client, {"guided_choice": choices}):
            assert text in choices
        pattern = r"[a-z]{3}-[0-9]{2,4}"
        for text in stopped_outputs(client, {"guided_regex": pattern}):
            assert re.fullmatch(pattern, text)
        assert completion(client, {"response_format": {"type": "text"}, "max_tokens": 4})["text"] is not None


def test_streaming_guided_output(server):
    with server.client() as client:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "stream": True, "guided_choice": ["alpha", "beta"]}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(line) for line in lines[:-1]]
        assert lines[-1] == "[DONE]"
        assert "".join(c["choices"][0]["text"] for c in chunks) in ("alpha", "beta")
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_guided_and_plain_requests_in_one_batch(server):
    """A plain greedy request batched with guided ones equals its output alone, and the guided ones are valid."""
    plain = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    schema = SCHEMAS["enum"]
    with server.client() as client:
        alone = completion(client, plain)["text"]
        bodies = [plain, {"guided_json": schema, "max_tokens": 60, "temperature": 0}] * 4
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda body: completion(client, body), bodies))
    for body, choice in zip(bodies, results):
        if "guided_json" in body:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["text"]), schema)
        else:
            assert choice["text"] == alone


class Point(pydantic.BaseModel):
    label: str = pydantic.Field(max_length=6)
    x: int
    visible: bool


def test_openai_sdk_parse_with_a_pydantic_model(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(6):
        out = parse(
            model="tiny",
            messages=[{"role": "user", "content": "a point"}],
            response_format=Point,
            max_tokens=160,
            seed=seed,
        )
        if out.choices[0].finish_reason == "stop":
            parsed = out.choices[0].message.parsed
            assert isinstance(parsed, Point)
            return
    pytest.fail("no parse run ended before max_tokens")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_field(server, body, param):
    with server.client() as client:
        for path, base in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            response = client.post(path, json={"model": "tiny", **base, **body})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, error
