"""The sampling and logprob fields over HTTP: logprobs and echo prompt logprobs equal `transformers`'
log-softmax on the same weights, n choices, several prompts, penalties, min_tokens, stop_token_ids,
truncate_prompt_tokens, continuous usage, and every bad value a 400 naming its field."""

from __future__ import annotations

import json

import pytest
import torch

from tests.api.conftest import metric_sum
from tests.service.engine_fixtures import tiny_tokenizer

PROMPT_IDS = [5, 17, 42, 99, 7, 63, 120, 8, 33, 250, 11, 4]


@pytest.fixture(scope="module")
def hf(zoo):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(zoo["tiny"], torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of transformers' logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(http, path: str, **body) -> dict:
    response = http.post(path, json={"model": "tiny", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_logprobs_equal_transformers_log_softmax(http, hf):
    out = post(http, "/v1/completions", prompt=PROMPT_IDS, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    tokenizer = tiny_tokenizer()
    ids = list(PROMPT_IDS)
    for i in range(6):  # greedy: the engine's token is transformers' argmax
        ref = hf_logprobs(hf, ids)[-1]
        best = int(ref.argmax())
        assert lp["tokens"][i] == tokenizer.decode([best], skip_special_tokens=False)
        assert abs(lp["token_logprobs"][i] - float(ref[best])) < 1e-4
        top = torch.topk(ref, 3)
        expected = {
            tokenizer.decode([t], skip_special_tokens=False): v
            for t, v in zip(top.indices.tolist(), top.values.tolist())
        }
        assert set(lp["top_logprobs"][i]) == set(expected)
        assert all(abs(lp["top_logprobs"][i][k] - v) < 1e-4 for k, v in expected.items())
        ids.append(best)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_with_max_tokens_0_scores_the_prompt_like_transformers(http, hf):
    """What lm-eval's loglikelihood sends: token-id prompts, echo, max_tokens 0, logprobs."""
    prompts = [PROMPT_IDS, PROMPT_IDS[3:] + [77, 78, 79] * 10]
    out = post(http, "/v1/completions", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, ids in zip(out["choices"], prompts):
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length" and choice["text"] == tiny_tokenizer().decode(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
        ref = hf_logprobs(hf, ids)
        expected = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < 1e-4
    assert out["usage"]["completion_tokens"] == 0
    again = post(http, "/v1/completions", prompt=prompts[1], max_tokens=0, echo=True, logprobs=0)  # now cached
    assert again["choices"][0]["logprobs"]["token_logprobs"] == out["choices"][1]["logprobs"]["token_logprobs"]


def test_echo_text_prompt_then_completion(http):
    plain = post(http, "/v1/completions", prompt="hello world", max_tokens=4, temperature=0, ignore_eos=True)
    echoed = post(
        http, "/v1/completions", prompt="hello world", max_tokens=4, temperature=0, ignore_eos=True, echo=True
    )
    assert echoed["choices"][0]["text"] == "hello world" + plain["choices"][0]["text"]


def test_n_choices_seeded_reproducible_distinct_and_prompt_shared(http, server):
    prompt = "def shared(prefix): return the quick brown fox jumps over the lazy dog " * 2
    body = dict(prompt=prompt, n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    before = metric_sum(server.metrics(), "modelserve_prefix_cache_hits_total", model="tiny")
    first = post(http, "/v1/completions", **body)
    hits = metric_sum(server.metrics(), "modelserve_prefix_cache_hits_total", model="tiny") - before
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert hits >= 2 * (prompt_tokens // 16) * 16 > 0  # choices 2 and 3 took choice 1's full blocks
    second = post(http, "/v1/completions", **body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in second["choices"]] and len(set(texts)) == 3
    assert first["usage"]["completion_tokens"] == 36
    # choice i is seeded from seed + i: choice 1 of seed 11 is choice 0 of seed 12
    shifted = post(http, "/v1/completions", **{**body, "n": 1, "seed": 12})
    assert shifted["choices"][0]["text"] == texts[1]


def test_batched_prompts_in_openai_order(http):
    prompts = ["hello world", "the quick brown"]
    out = post(http, "/v1/completions", prompt=prompts, n=2, max_tokens=5, temperature=0, ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = post(http, "/v1/completions", prompt=prompt, max_tokens=5, temperature=0, ignore_eos=True)
        assert [out["choices"][p * 2 + j]["text"] for j in range(2)] == [alone["choices"][0]["text"]] * 2
    assert out["usage"]["completion_tokens"] == 20


def test_penalties_change_greedy_output(http):
    base = dict(prompt=PROMPT_IDS, max_tokens=16, temperature=0, ignore_eos=True)
    plain = post(http, "/v1/completions", **base)["choices"][0]["text"]
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}, {"min_p": 0.5}):
        text = post(http, "/v1/completions", **base, **extra)["choices"][0]["text"]
        assert (text != plain) == ("min_p" not in extra), extra  # min_p does not change greedy


def test_logit_bias_stop_token_ids_and_min_tokens(http):
    base = dict(prompt=PROMPT_IDS, max_tokens=8, temperature=0, logit_bias={"77": 100})
    forced = post(http, "/v1/completions", **base, ignore_eos=True)["choices"][0]
    assert forced["text"] == tiny_tokenizer().decode([77] * 8)
    stopped = post(http, "/v1/completions", **base, stop_token_ids=[77])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 0
    later = post(http, "/v1/completions", **base, stop_token_ids=[77], min_tokens=3)
    assert later["choices"][0]["finish_reason"] == "stop" and later["usage"]["completion_tokens"] == 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(http):
    base = dict(max_tokens=5, temperature=0, ignore_eos=True)
    cut = post(http, "/v1/completions", prompt=PROMPT_IDS, truncate_prompt_tokens=4, **base)
    tail = post(http, "/v1/completions", prompt=PROMPT_IDS[-4:], **base)
    assert cut["usage"]["prompt_tokens"] == 4 and cut["choices"][0]["text"] == tail["choices"][0]["text"]


def sse_chunks(http, path: str, **body) -> list[dict]:
    with http.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streaming_continuous_usage_and_n(http):
    chunks = sse_chunks(
        http,
        "/v1/completions",
        prompt="hello",
        n=2,
        seed=1,
        max_tokens=6,
        ignore_eos=True,
        logprobs=1,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    *pieces, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is not None for c in pieces)
    for index in (0, 1):
        mine = [c for c in pieces if c["choices"][0]["index"] == index]
        counts = [c["usage"]["completion_tokens"] for c in mine]
        assert counts == sorted(counts) and counts[-1] == 6
        assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in mine) == 6
        assert mine[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_streaming_and_not(http):
    body = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, ignore_eos=True)
    out = post(http, "/v1/chat/completions", **body, logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
        assert bytes(entry["bytes"]).decode() == entry["token"]
    chunks = sse_chunks(http, "/v1/chat/completions", **body, logprobs=True, top_logprobs=2)
    streamed = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in content]
    plain = post(http, "/v1/chat/completions", **body, max_completion_tokens=3)  # max_tokens wins when both
    assert plain["usage"]["completion_tokens"] == 5
    alias = post(http, "/v1/chat/completions", **{**body, "max_tokens": None}, max_completion_tokens=3)
    assert alias["usage"]["completion_tokens"] == 3


BAD = [
    ("/v1/completions", {"n": -1}, "n"),
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logit_bias": {"5": -101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"five": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"stop_token_ids": [1, "2"]}, "stop_token_ids.1"),
    ("/v1/completions", {"stop_token_ids": [99999]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 2.5]]}, "prompt.1.1"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"min_tokens": 9}, "min_tokens"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (
        "/v1/completions",
        {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
        "stream_options.continuous_usage_stats",
    ),
]


@pytest.mark.parametrize("path,extra,param", BAD, ids=[json.dumps(row[1]) for row in BAD])
def test_bad_values_name_the_field(http, path, extra, param):
    body = {"prompt": "hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = http.post(path, json={"model": "tiny", "max_tokens": 4, **body, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_streaming_echo_equals_non_streaming(http):
    body = dict(prompt=PROMPT_IDS, max_tokens=3, echo=True, logprobs=1, temperature=0, ignore_eos=True)
    whole = post(http, "/v1/completions", **body)["choices"][0]
    chunks = sse_chunks(http, "/v1/completions", **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed == whole["logprobs"]["token_logprobs"] and streamed[0] is None
    offsets = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert offsets == whole["logprobs"]["text_offset"]


def test_echo_with_n_shares_the_prompt_scores(http):
    body = dict(prompt=PROMPT_IDS, max_tokens=2, echo=True, logprobs=0, n=2, seed=3, ignore_eos=True)
    first, second = post(http, "/v1/completions", **body)["choices"]
    k = len(PROMPT_IDS)
    assert first["logprobs"]["token_logprobs"][:k] == second["logprobs"]["token_logprobs"][:k]
    assert len(first["logprobs"]["tokens"]) == len(second["logprobs"]["tokens"]) == k + 2
