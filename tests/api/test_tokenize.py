"""vLLM's `/tokenize` and `/detokenize`: the same tokenization as generation, round trips, clear 4xx."""

from __future__ import annotations


def test_tokenize_counts_what_a_completion_counts_and_detokenize_inverts_it(server):
    with server.client() as client:
        tokens = client.post("/tokenize", json={"model": "tiny", "prompt": "hello world"}).json()
        done = client.post("/v1/completions", json={"model": "a1", "prompt": "hello world", "max_tokens": 1}).json()
        assert tokens["count"] == len(tokens["tokens"]) == done["usage"]["prompt_tokens"]
        assert tokens["max_model_len"] > tokens["count"]
        text = client.post("/detokenize", json={"model": "tiny", "tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith("hello world")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        rendered = client.post("/tokenize", json={"model": "tiny", "messages": chat["messages"]}).json()
        answer = client.post("/v1/chat/completions", json=chat).json()
        assert rendered["count"] == answer["usage"]["prompt_tokens"]


def test_tokenizer_routes_refuse_bad_input_with_the_error_shape(server):
    cases = [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
        ("/tokenize", {"model": "tiny"}, 400),
        ("/tokenize", {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400),
        ("/detokenize", {"model": "tiny", "tokens": [10**9]}, 400),
        ("/detokenize", {"model": "tiny", "tokens": ["a"]}, 400),
    ]
    with server.client() as client:
        for path, body, status in cases:
            response = client.post(path, json=body)
            assert response.status_code == status, (body, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
