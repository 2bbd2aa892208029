"""Fault injection in the engine: a forward that raises, a row of NaN logits, a stuck or dead loop.

Only the requests a fault touches fail; the rest of the batch completes, the engine stays alive,
every KV slot comes back, and no request can hang.
"""

from __future__ import annotations

import threading

import torch

from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
from service.engine.worker import NONFINITE_MESSAGE
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer
from tests.service.test_engine import run_all

MIXED = [  # every kind of sampling the schema allows, extremes included
    SamplingParams(max_tokens=8, temperature=0.0),
    SamplingParams(max_tokens=8, temperature=1e-40),
    SamplingParams(max_tokens=8, temperature=1.0, top_p=5e-324),
    SamplingParams(max_tokens=8, temperature=2.0, top_k=3, seed=1),
    SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=2),
]


def start_engine(**config) -> tuple[Engine, object]:
    tokenizer = tiny_tokenizer()
    engine = Engine(EngineConfig(**config))
    engine.add_model(ServedModel("tiny", tiny_model(tokenizer.vocab_size), tokenizer, max_model_len=128))
    engine.start()
    return engine, engine.workers["tiny"]


def settled(engine: Engine, worker) -> bool:
    for _ in range(200):
        if not worker.has_work and worker.blocks.num_held == 0 and engine.num_unfinished() == 0:
            return True
        threading.Event().wait(0.02)
    return False


def requests(prefix: str, count: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}{i}", "tiny", [5 + i, 6, 7], MIXED[i % len(MIXED)]) for i in range(count)]


def test_a_forward_that_raises_fails_only_that_steps_requests():
    engine, worker = start_engine()
    model, calls = worker.runner.model, [0]
    forward = model.forward

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # a decode step in the middle of the run
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    model.forward = faulty
    try:
        events = run_all(engine, requests("f", 10))
        reasons = {rid: got[-1].finish_reason for rid, got in events.items()}
        failed = [rid for rid, reason in reasons.items() if reason == "error"]
        assert 0 < len(failed) <= 10 and all("injected fault" in events[r][-1].error for r in failed)
        assert engine.alive
        again = run_all(engine, requests("g", 10))  # the engine goes on serving
        assert all(got[-1].finish_reason == "length" for got in again.values())
        assert settled(engine, worker)
    finally:
        engine.stop()


def test_nan_logits_fail_that_request_alone():
    engine, worker = start_engine()
    run = worker.runner.run

    def poisoned(rows):
        output = run(rows)
        for row in rows:
            if row.sequence.request_id == "f3" and id(row.sequence) in output.logits:
                output.logits[id(row.sequence)] = torch.full_like(output.logits[id(row.sequence)], float("nan"))
        return output

    worker.runner.run = poisoned
    try:
        events = run_all(engine, requests("f", 8))
        assert events["f3"][-1].finish_reason == "error" and events["f3"][-1].error == NONFINITE_MESSAGE
        assert all(got[-1].finish_reason == "length" for rid, got in events.items() if rid != "f3")
        assert engine.alive and settled(engine, worker)
    finally:
        engine.stop()


def test_a_stuck_loop_cannot_hang_a_request_and_frees_it_later():
    engine, worker = start_engine()
    release, entered = threading.Event(), threading.Event()
    run = worker.runner.run

    def stuck(rows):
        entered.set()
        release.wait(10)
        return run(rows)

    worker.runner.run = stuck
    try:
        done = threading.Event()
        got = []
        engine.submit(
            GenerationRequest("s", "tiny", [5, 6], SamplingParams(max_tokens=4)),
            lambda e: (got.append(e), done.set() if e.finish_reason else None),
        )
        assert entered.wait(10)
        engine.abandon("s")  # what the HTTP layer does when request_timeout_s passes and the loop does not answer
        assert done.wait(1) and got[-1].finish_reason == "abort"
        release.set()
        assert settled(engine, worker) and len([e for e in got if e.finish_reason]) == 1
    finally:
        release.set()
        engine.stop()


def test_cancel_after_the_loop_died_ends_the_request_at_once():
    engine, worker = start_engine(max_consecutive_step_failures=1)
    entered, release = threading.Event(), threading.Event()

    def dies(rows):
        entered.set()
        release.wait(10)
        raise RuntimeError("fatal")

    worker.runner.run = dies
    done = threading.Event()
    got = []
    engine.submit(
        GenerationRequest("x", "tiny", [5, 6], SamplingParams(max_tokens=4)),
        lambda e: (got.append(e), done.set() if e.finish_reason else None),
    )
    assert entered.wait(10)
    release.set()
    assert done.wait(10) and got[-1].finish_reason == "error"
    for _ in range(250):  # the request's error event comes before the loop marks itself dead
        if not engine.alive:
            break
        threading.Event().wait(0.02)
    assert not engine.alive
    engine.cancel("x")  # nothing left to end: no second final event, no hang
    assert len([e for e in got if e.finish_reason]) == 1
    engine.stop()
