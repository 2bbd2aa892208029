"""The official `openai` client with n, logprobs, echo, batched prompts and streaming usage."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_n_with_seed_and_logprobs(client):
    kwargs = dict(
        model="tiny", prompt="hello world", n=3, seed=5, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True}
    )
    out = client.completions.create(**kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 24
    assert len({c.text for c in out.choices}) == 3
    assert [c.text for c in client.completions.create(**kwargs).choices] == [c.text for c in out.choices]
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
        assert all(value <= 0 for value in lp.token_logprobs)


def test_echo_and_batched_prompts(client):
    out = client.completions.create(model="tiny", prompt=["hello", "the lazy dog"], max_tokens=0, echo=True, logprobs=0)
    assert [c.text for c in out.choices] == ["hello", "the lazy dog"]
    for choice in out.choices:
        assert choice.logprobs.token_logprobs[0] is None and all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0, n=2)
    assert [c.index for c in ids.choices] == [0, 1, 2, 3]


def test_streaming_n_with_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            n=2,
            max_tokens=4,
            logprobs=True,
            top_logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    finished = sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason)
    assert finished == [0, 1]
    tokens = [t for c in chunks[:-1] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == 8 and all(len(t.top_logprobs) == 1 for t in tokens)
