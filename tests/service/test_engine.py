"""The engine with a tiny random model: batching invariance, sampling, stops, limits, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from models import SamplingConfig, generate
from service.engine import (
    Engine,
    EngineConfig,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestTooLargeError,
    SamplingParams,
    SchedulerConfig,
    ServedModel,
    UnknownModelError,
)
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_engine(tokenizer, moe=False, **scheduler) -> Engine:
    engine = Engine(EngineConfig(scheduler=SchedulerConfig(**scheduler)))
    model = tiny_model(tokenizer.vocab_size, moe=moe)
    engine.add_model(ServedModel("tiny", model, tokenizer, max_model_len=128))
    engine.start()
    return engine


def run_all(engine: Engine, requests: list[GenerationRequest], timeout: float = 60) -> dict[str, list]:
    """Submit every request at once and collect each one's events."""
    done = threading.Event()
    events: dict[str, list] = {r.request_id: [] for r in requests}
    remaining = [len(requests)]
    lock = threading.Lock()

    def on_event(event):
        events[event.request_id].append(event)
        if event.finish_reason is not None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    for request in requests:
        engine.submit(request, on_event)
    assert done.wait(timeout), "requests did not finish"
    return events


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


@pytest.mark.parametrize("moe", [False, True])
def test_concurrent_greedy_requests_equal_each_alone(tokenizer, moe):
    engine = make_engine(tokenizer, moe=moe, max_tokens_per_step=24)  # forces chunked prefill
    try:
        prompts = [tokenizer.encode(t) for t in ["hello world", "the quick brown fox jumps over the lazy dog", "def"]]
        prompts += [p[:3] for p in prompts]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        requests = [GenerationRequest(f"r{i}", "tiny", p, params) for i, p in enumerate(prompts)]
        events = run_all(engine, requests)
        model = engine.workers["tiny"].served.model
        for request in requests:
            alone = generate(model, [request.prompt_ids], SamplingConfig(max_new_tokens=12))[0]
            assert tokens_of(events[request.request_id]) == alone
            final = events[request.request_id][-1]
            assert final.finish_reason == "length" and final.completion_tokens == 12
            text = "".join(e.text for e in events[request.request_id])
            assert text == tokenizer.decode(alone)
        assert engine.workers["tiny"].blocks.num_held == 0
    finally:
        engine.stop()


def test_seeded_sample_is_the_same_whatever_the_batch(tokenizer):
    engine = make_engine(tokenizer)
    try:
        prompt = tokenizer.encode("hello")
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
        alone = tokens_of(run_all(engine, [GenerationRequest("a", "tiny", prompt, params)])["a"])
        others = [
            GenerationRequest(f"o{i}", "tiny", tokenizer.encode("the lazy dog"), SamplingParams(max_tokens=16))
            for i in range(5)
        ]
        batched = run_all(engine, [*others, GenerationRequest("b", "tiny", prompt, params)])
        assert tokens_of(batched["b"]) == alone
    finally:
        engine.stop()


def test_stop_string_cuts_output_and_finishes(tokenizer):
    engine = make_engine(tokenizer)
    try:
        prompt = tokenizer.encode("hello world")
        free = run_all(engine, [GenerationRequest("f", "tiny", prompt, SamplingParams(max_tokens=20, temperature=0))])
        text = "".join(e.text for e in free["f"])
        stop = text[5:8]
        assert len(stop) == 3
        cut = run_all(
            engine,
            [GenerationRequest("s", "tiny", prompt, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))],
        )["s"]
        assert cut[-1].finish_reason == "stop"
        assert "".join(e.text for e in cut) == text[: text.index(stop)]
    finally:
        engine.stop()


def test_limits_are_refused_up_front_with_the_limit_named(tokenizer):
    engine = make_engine(tokenizer, max_waiting=2, max_batch_size=1)
    try:
        with pytest.raises(RequestTooLargeError, match="max_model_len=128"):
            engine.submit(GenerationRequest("x", "tiny", [5] * 100, SamplingParams(max_tokens=29)), lambda e: None)
        with pytest.raises(UnknownModelError):
            engine.submit(GenerationRequest("y", "nope", [5], SamplingParams()), lambda e: None)
        with pytest.raises(RequestTooLargeError, match="empty"):
            engine.submit(GenerationRequest("z", "tiny", [], SamplingParams()), lambda e: None)
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        with pytest.raises(QueueFullError, match="max_waiting=2"):
            for i in range(10):
                engine.submit(GenerationRequest(f"q{i}", "tiny", [5, 6], long), lambda e: None)
    finally:
        engine.stop()


def test_cancelled_stream_frees_its_slot(tokenizer):
    engine = make_engine(tokenizer)

    async def consume_two():
        request = GenerationRequest(
            "c", "tiny", tokenizer.encode("hello"), SamplingParams(max_tokens=100, ignore_eos=True)
        )
        agen = engine.stream(request)
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return got

    try:
        got = asyncio.run(consume_two())
        assert len(got) == 2
        worker = engine.workers["tiny"]
        for _ in range(100):
            if worker.blocks.num_held == 0 and not worker.has_work:
                break
            threading.Event().wait(0.02)
        assert worker.blocks.num_held == 0
        assert engine.num_unfinished() == 0
    finally:
        engine.stop()


def test_engine_death_is_visible_and_fails_pending_requests(tokenizer):
    """Failed steps in a row (max_consecutive_step_failures) kill the engine; later submissions are refused."""
    engine = Engine(EngineConfig(max_consecutive_step_failures=2))
    engine.add_model(ServedModel("tiny", tiny_model(tokenizer.vocab_size), tokenizer, max_model_len=128))
    engine.start()
    worker = engine.workers["tiny"]

    def explode(rows):
        raise RuntimeError("boom")

    worker.runner.run = explode
    for i in range(2):  # one request at a time: two failed steps in a row
        assert engine.alive
        events = run_all(engine, [GenerationRequest(f"d{i}", "tiny", [5, 6], SamplingParams(max_tokens=4))])
        assert events[f"d{i}"][-1].finish_reason == "error" and "boom" in events[f"d{i}"][-1].error
    for _ in range(100):
        if not engine.alive:
            break
        threading.Event().wait(0.02)
    assert not engine.alive and "2 engine steps failed in a row" in str(engine.error)
    with pytest.raises(EngineUnavailableError):
        engine.submit(GenerationRequest("late", "tiny", [5], SamplingParams(max_tokens=2)), lambda e: None)
    engine.stop()
