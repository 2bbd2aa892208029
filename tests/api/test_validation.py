"""Bad inputs each get their status and error type in the OpenAI shape, never a 500; ops routes and docs."""

from __future__ import annotations

import json

import pytest

GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    # (path, body, status, error type, param)
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "hello " * 300}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": 250, "prompt": "hello " * 20}, 400, "invalid_request_error", None),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 2.5}, 400, "invalid_request_error", "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -2}, 400, "invalid_request_error", "top_k"),
    ("/v1/completions", {**GOOD, "seed": -1}, 400, "invalid_request_error", "seed"),
    ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error", "stop"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "invalid_request_error", "stop"),
    ("/v1/completions", {**GOOD, "n": 17}, 400, "invalid_request_error", "n"),
    ("/v1/completions", {**GOOD, "echo": "yes"}, 400, "invalid_request_error", "echo"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 101}}, 400, "invalid_request_error", "logit_bias"),
    (
        "/v1/load_lora_adapter",
        {"lora_name": "x", "lora_path": "y", "frobnicate": 1},
        400,
        "invalid_request_error",
        "frobnicate",
    ),
    ("/v1/completions", {**GOOD, "prompt": "a\ud800b"}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, 99999]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", 5]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "invalid_request_error", "model"),
    ("/v1/completions", {**GOOD, "model": "nope"}, 404, "not_found_error", "model"),
    ("/v1/completions", [1, 2], 400, "invalid_request_error", None),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_request_error", "messages"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "invalid_request_error",
        None,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "invalid_request_error",
        "messages",
    ),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "invalid_request_error", "tool_choice"),
    (
        "/v1/chat/completions",
        {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        400,
        "invalid_request_error",
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "yaml"}},  # json_object and json_schema: test_structured_output.py
        400,
        "invalid_request_error",
        "response_format",
    ),
    ("/v1/chat/completions", {**CHAT, "model": "a9"}, 404, "not_found_error", "model"),
]


@pytest.mark.parametrize("path,body,status,kind,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_table(server, path, body, status, kind, param):
    with server.client() as client:
        # json.dumps escapes non-ASCII (\ud800 stays an escape: valid JSON, invalid UTF-8 once decoded)
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == kind
    if param is not None:
        assert error["param"] == param or (error["param"] or "").startswith(param), error


@pytest.mark.parametrize("raw", [b'{"model": "tiny", "prompt": "\xff\xfe"}', b"{not json", b""])
def test_undecodable_bodies_are_400(server, raw):
    with server.client() as client:
        response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_use_the_error_shape(server):
    with server.client() as client:
        assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert client.get("/v1/completions").status_code == 405


def test_health_ready_and_offline_docs(server):
    with server.client() as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/ready").status_code == 200
        docs = client.get("/docs")
        assert docs.status_code == 200 and "http://" not in docs.text and "https://" not in docs.text
        for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
            assert client.get(asset).status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter"} <= set(
            schema["paths"]
        )


def test_unknown_fields_are_ignored_logged_and_named_in_a_header(server):
    with server.client() as client:
        body = {**GOOD, "frobnicate": 1, "metadata": {"a": 1}, "stream_options": {"include_usage": True, "x": 2}}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-modelserve-ignored-fields"] == "frobnicate,metadata"
        chat = {
            **CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
            "response_format": {"type": "text"},
            "messages": [{"role": "user", "content": "hi", "tool_calls": None}],
            "store": False,
        }
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-modelserve-ignored-fields"] == "store"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.headers["x-modelserve-ignored-fields"] == "frobnicate,metadata"
            assert "".join(streamed.iter_text()).rstrip().endswith("data: [DONE]")
