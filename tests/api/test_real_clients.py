"""Real clients, unchanged, against the served tiny zoo: lm-evaluation-harness and langchain-openai.

lm-eval runs a local task (a JSON-lines file and a task YAML written here; nothing is downloaded) through its
`local-completions` model (loglikelihood: echo + logprobs; generate_until) and `local-chat-completions`
(generate_until), then the same task through its own `hf` backend on the served weights: accuracy and
greedy generations are identical and every loglikelihood agrees within 1e-3. langchain-openai's `ChatOpenAI`
streams the same text it answers whole, and `with_structured_output(..., method="json_schema")` parses.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Literal

import datasets
import lm_eval
import numpy as np
import pytest
import torch
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from lm_eval.tasks import TaskManager
from pydantic import BaseModel

# (question, choices, index of the right one): the model is random, so accuracy is whatever it is.
ITEMS = [
    ("The sky is", [" blue", " green", " loud"], 0),
    ("Two plus two is", [" four", " five"], 0),
    ("Water freezes at zero", [" degrees", " apples", " cars"], 0),
    ("A cat says", [" meow", " moo"], 0),
    ("Paris is in", [" France", " Peru", " Mars"], 0),
    ("The opposite of hot is", [" cold", " tall"], 0),
    ("Bees make", [" honey", " steel", " glass"], 0),
    ("One, two,", [" three", " seven"], 0),
    ("Snow is", [" white", " black", " red"], 0),
    ("The sun rises in the", [" east", " west"], 0),
]
MC, GEN = "modelserve_tiny_mc", "modelserve_tiny_gen"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Nothing here reaches past this machine (no hub, no downloads): any other address is refused and named."""
    refused: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in LOOPBACK:
            refused.append(f"connect {address!r}")
            raise OSError(f"network access to {address!r} refused in this test")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            refused.append(f"resolve {name!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"resolving {name!r} refused in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        # `datasets` reads these at import; online, load_dataset("json") sends a usage-count HEAD to S3.
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield refused
    assert not refused, f"the clients tried to reach the network: {refused}"


def write_tasks(directory: Path) -> None:
    """A loglikelihood (multiple-choice) task and a generate_until task over the same JSON-lines file."""
    data = directory / "items.jsonl"
    rows = [{"question": q, "choices": c, "answer": a, "target": c[a]} for q, c, a in ITEMS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
    )
    (directory / "mc.yaml").write_text(
        f"task: {MC}\noutput_type: multiple_choice\n{source}"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "gen.yaml").write_text(
        f"task: {GEN}\noutput_type: generate_until\n{source}"
        'doc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(directory)
    return TaskManager(include_path=str(directory), include_defaults=False)


def evaluate(task_manager: TaskManager, model: str, model_args: dict, tasks: list[str], **kwargs) -> dict:
    # simple_evaluate seeds the global random, numpy and torch generators; later tests get theirs back.
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=0,
            **kwargs,
        )
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
    for task in tasks:
        assert len(out["samples"][task]) == len(ITEMS), task
    return out


def by_doc(out: dict, task: str) -> dict[int, dict]:
    return {sample["doc_id"]: sample for sample in out["samples"][task]}


def loglikelihoods(sample: dict) -> list[float]:
    """A multiple-choice sample holds one (loglikelihood, is_greedy) response per choice; the loglikelihoods."""
    return [float(resp[0]) for resp in sample["filtered_resps"]]


@pytest.fixture(scope="module")
def hf_backend(zoo, task_manager) -> dict:
    """lm-eval's own `hf` backend on the served model's directory: plain prompts and chat-templated ones."""
    args = {"pretrained": str(zoo["tiny"]), "dtype": "float32", "device": "cpu", "batch_size": 1}
    return {
        "plain": evaluate(task_manager, "hf", args, [MC, GEN]),
        "chat": evaluate(task_manager, "hf", args, [GEN], apply_chat_template=True),
    }


def test_lm_eval_local_completions_matches_hf_backend(server, zoo, task_manager, hf_backend, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    ours = evaluate(
        task_manager,
        "local-completions",
        {
            "model": "tiny",
            "base_url": f"{server.url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(zoo["tiny"]),  # the served directory's tokenizer: no hub access
            "max_length": 256,
            "max_retries": 1,
        },
        [MC, GEN],
    )
    hf = hf_backend["plain"]
    assert ours["results"][MC]["acc,none"] == hf["results"][MC]["acc,none"]
    ours_mc, hf_mc = by_doc(ours, MC), by_doc(hf, MC)
    for doc_id, (question, choices, _) in enumerate(ITEMS):
        ll_ours, ll_hf = loglikelihoods(ours_mc[doc_id]), loglikelihoods(hf_mc[doc_id])
        assert len(ll_ours) == len(ll_hf) == len(choices), question
        assert ll_ours == pytest.approx(ll_hf, abs=1e-3), question
        assert ours_mc[doc_id]["acc"] == hf_mc[doc_id]["acc"], question
        # is_greedy: from the response's top_logprobs (ours) and from the argmax (hf)
        assert [bool(r[1]) for r in ours_mc[doc_id]["filtered_resps"]] == [
            bool(r[1]) for r in hf_mc[doc_id]["filtered_resps"]
        ], question
    # generate_until, greedy: the same weights give the same text through the server as through transformers.
    ours_gen, hf_gen = by_doc(ours, GEN), by_doc(hf, GEN)
    assert {i: s["filtered_resps"] for i, s in ours_gen.items()} == {i: s["filtered_resps"] for i, s in hf_gen.items()}
    assert ours["results"][GEN]["exact_match,none"] == hf["results"][GEN]["exact_match,none"]


def test_lm_eval_local_chat_completions_generate_until(server, task_manager, hf_backend, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    ours = evaluate(
        task_manager,
        "local-chat-completions",
        {"model": "tiny", "base_url": f"{server.url}/v1/chat/completions", "tokenizer_backend": None, "max_retries": 1},
        [GEN],
        apply_chat_template=True,
    )
    prompt = by_doc(ours, GEN)[0]["arguments"][0][0]  # a JsonChatStr: the messages lm-eval posted
    sent = json.loads(prompt[0] if isinstance(prompt, (tuple, list)) else prompt)
    assert sent == [{"role": "user", "content": ITEMS[0][0]}]
    # The server renders the model's chat template as transformers does, so greedy answers equal hf's.
    hf = hf_backend["chat"]
    ours_gen, hf_gen = by_doc(ours, GEN), by_doc(hf, GEN)
    assert {i: s["filtered_resps"] for i, s in ours_gen.items()} == {i: s["filtered_resps"] for i, s in hf_gen.items()}
    assert ours["results"][GEN]["exact_match,none"] == hf["results"][GEN]["exact_match,none"]


def chat_model(server, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(
        model="tiny", base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_retries=0, timeout=30, **kwargs
    )


def test_langchain_stream_equals_invoke(server):
    llm = chat_model(server, max_tokens=16, stream_usage=True)
    whole = llm.invoke("Tell me a story")
    chunks = list(llm.stream("Tell me a story"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert len([c for c in chunks if c.content]) > 1  # really streamed, not one piece
    assert "".join(chunk.content for chunk in chunks) == whole.content != ""
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == whole.content
    assert merged.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]
    assert merged.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
    assert merged.usage_metadata["input_tokens"] == whole.usage_metadata["input_tokens"]


class Wind(BaseModel):
    strong: bool
    direction: Literal["north", "south", "east", "west"]


class Weather(BaseModel):
    sky: Literal["clear", "cloudy", "rain"]
    windy: bool
    wind: Wind


def test_langchain_structured_output_json_schema(server):
    llm = chat_model(server, max_tokens=160).with_structured_output(Weather, method="json_schema", include_raw=True)
    out = llm.invoke("Describe the weather today.")
    assert out["parsing_error"] is None, out["raw"]
    assert out["raw"].response_metadata["finish_reason"] == "stop"
    assert isinstance(out["parsed"], Weather) and isinstance(out["parsed"].wind, Wind)
    assert Weather.model_validate_json(out["raw"].content) == out["parsed"]
    # The plain form of the same call returns the parsed object itself.
    parsed = chat_model(server, max_tokens=160).with_structured_output(Weather, method="json_schema").invoke("Hi")
    assert isinstance(parsed, Weather)
