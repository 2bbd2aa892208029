"""The official `openai` client against the server: completions, chat, streaming, adapters, typed errors."""

from __future__ import annotations

import openai
import pytest

from tests.api.zoo import CHAT_TEMPLATE
from tests.service.engine_fixtures import tiny_tokenizer


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_non_streaming(client):
    out = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tiny_tokenizer().encode("hello world"))
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(
        model="tiny", prompt="the quick brown fox", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    plain = list(client.completions.create(**kwargs, stream=True))
    assert all(c.usage is None for c in plain)


def test_chat_uses_the_models_template(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    from jinja2 import Template

    tokenizer = tiny_tokenizer()
    rendered = Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_chat_default_template_for_a_model_without_one(client):
    out = client.chat.completions.create(model="moe", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    tokenizer = tiny_tokenizer()
    assert out.usage.prompt_tokens == len(tokenizer.encode("<s><|user|>\nhi\n<|assistant|>\n"))


def test_adapter_selection_changes_output_and_models_lists_parents(client):
    kwargs = dict(prompt="hello world, hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    texts = {m: client.completions.create(model=m, **kwargs).choices[0].text for m in ("tiny", "a1", "a2")}
    assert len(set(texts.values())) == 3
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "moe", "a1", "a2"} <= set(models)
    assert models["a1"].parent == "tiny" and models["tiny"].parent is None
    assert models["a1"].lora_rank == 4 and models["a1"].size_bytes > 0 and models["tiny"].parameters > 0


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="tiny", prompt="hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_string(client):
    base = dict(model="tiny", prompt="hello world", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**base).choices[0].text
    stop = text[4:6]
    cut = client.completions.create(**base, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]


def test_errors_surface_as_typed_exceptions(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi")
    assert info.value.body["type"] == "not_found_error" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
