"""Paged KV cache, prefix caching and preemption: greedy outputs equal `peft`/`transformers`, blocks never leak.

Prompts share 0, some or all of their blocks, across adapters (a prefix computed under one adapter
must never serve another, nor a different adapter later loaded under the same name), with prefix
caching on and off, and under a pool so small that sequences are preempted and recomputed.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from adapters.registry import AdapterRegistry
from models import load_model
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, SchedulerConfig, ServedModel
from service.engine.block_manager import BlockManager, BlockTable
from tests.adapters.test_multi_lora import peft_greedy, setup  # noqa: F401  (setup is a fixture)
from tests.models.hf_fixtures import VOCAB
from tests.service.engine_fixtures import tiny_tokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def make_engine(root, adapters=("a1", "a2"), **scheduler) -> tuple[Engine, AdapterRegistry]:
    model = load_model(root / "base")
    registry = AdapterRegistry("base", model)
    for name in adapters:
        registry.load(name, root / name)
    engine = Engine(EngineConfig(scheduler=SchedulerConfig(**scheduler)))
    engine.add_model(ServedModel("base", model, tiny_tokenizer(), max_model_len=64, registry=registry))
    engine.start()
    return engine, registry


def run(engine: Engine, plan: list[tuple[str | None, list[int]]], params=GREEDY, prefix="r") -> dict[str, list]:
    events: dict[str, list] = {}
    done = threading.Event()
    lock = threading.Lock()

    def on_event(event):
        with lock:
            events.setdefault(event.request_id, []).append(event)
            if sum(1 for got in events.values() if got[-1].finish_reason) == len(plan):
                done.set()

    for i, (adapter, prompt) in enumerate(plan):
        engine.submit(GenerationRequest(f"{prefix}{i}", "base", prompt, params, adapter=adapter), on_event)
    assert done.wait(120), "requests did not finish"
    return events


def tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def expected(peft_models, adapter, prompt, n=8) -> list[int]:
    if adapter is None:
        base = next(iter(peft_models.values()))
        with base.disable_adapter():
            return peft_greedy(base, prompt, n)
    return peft_greedy(peft_models[adapter], prompt, n)


def prompts(seed: int) -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, VOCAB, (40,), generator=gen).tolist()  # 2.5 blocks of 16
    tails = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (0, 3, 9, 12)]
    return shared, [shared + tail for tail in tails] + [torch.randint(3, VOCAB, (20,), generator=gen).tolist()]


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_on_and_off_equals_peft_across_adapters(setup, caching):  # noqa: F811
    root, peft_models = setup
    engine, _ = make_engine(root, enable_prefix_caching=caching)
    try:
        _, group = prompts(1)
        plan = [(adapter, prompt) for adapter in (None, "a1", "a2") for prompt in group]
        first = run(engine, plan, prefix="w1-")  # registers the blocks
        second = run(engine, plan, prefix="w2-")  # same prompts again: served from the cache when on
        for i, (adapter, prompt) in enumerate(plan):
            want = expected(peft_models, adapter, prompt)
            assert tokens(first[f"w1-{i}"]) == want, f"first wave, request {i} on {adapter}"
            assert tokens(second[f"w2-{i}"]) == want, f"second wave, request {i} on {adapter}"
        worker = engine.workers["base"]
        cached = [second[f"w2-{i}"][-1].cached_tokens for i in range(len(plan))]
        if caching:
            assert worker.blocks.stats.hits > 0 and max(cached) >= 32
            assert all(c < len(p) for c, (_, p) in zip(cached, plan))  # the last token is always computed
        else:
            assert worker.blocks.stats.hits == 0 and max(cached) == 0
        worker.blocks.check()
        assert worker.blocks.num_held == 0
    finally:
        engine.stop()


def test_an_adapter_reloaded_under_the_same_name_does_not_reuse_the_old_prefix(setup):  # noqa: F811
    root, peft_models = setup
    engine, registry = make_engine(root)
    try:
        shared, _ = prompts(2)
        prompt = shared + [5, 6, 7]
        assert tokens(run(engine, [("a1", prompt)])["r0"]) == expected(peft_models, "a1", prompt)
        registry.unload("a1")
        registry.load("a1", root / "a2")  # another adapter under the old name
        got = run(engine, [("a1", prompt)], prefix="again")["again0"]
        assert tokens(got) == expected(peft_models, "a2", prompt)
        assert got[-1].cached_tokens == 0
    finally:
        engine.stop()


def test_preemption_under_a_small_pool_keeps_outputs_and_frees_every_block(setup):  # noqa: F811
    root, peft_models = setup
    # 6 blocks of 16 for 6 sequences of up to 12 + 24 tokens: decode runs out and preempts.
    engine, _ = make_engine(root, kv_cache_tokens=96, max_batch_size=6)
    try:
        gen = torch.Generator().manual_seed(3)
        plan = [(("a1", None, "a2")[i % 3], torch.randint(3, VOCAB, (12,), generator=gen).tolist()) for i in range(6)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        events = run(engine, plan, params)
        for i, (adapter, prompt) in enumerate(plan):
            assert tokens(events[f"r{i}"]) == expected(peft_models, adapter, prompt, 24), f"request {i}"
        worker = engine.workers["base"]
        assert worker.blocks.stats.preemptions > 0
        worker.blocks.check()
        assert worker.blocks.num_held == 0
    finally:
        engine.stop()


def test_randomized_finish_cancel_and_preemption_leak_no_block(setup):  # noqa: F811
    root, _ = setup
    engine, registry = make_engine(root, kv_cache_tokens=128, max_batch_size=8, max_tokens_per_step=48)
    rng = random.Random(0)
    shared = [rng.randrange(3, VOCAB) for _ in range(20)]
    try:
        done = threading.Event()
        finished: set[str] = set()
        total = 40

        def on_event(event):
            if event.finish_reason:
                finished.add(event.request_id)
                if len(finished) == total:
                    done.set()

        for i in range(total):
            prompt = (shared if rng.random() < 0.5 else []) + [
                rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))
            ]
            params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 1.0]), ignore_eos=True)
            adapter = rng.choice([None, "a1", "a2"])
            engine.submit(GenerationRequest(f"x{i}", "base", prompt, params, adapter=adapter), on_event)
            if rng.random() < 0.3:
                engine.cancel(f"x{rng.randrange(i + 1)}")
        assert done.wait(120)
        worker = engine.workers["base"]
        for _ in range(100):
            if not worker.has_work:
                break
            threading.Event().wait(0.02)
        worker.blocks.check()
        assert worker.blocks.num_held == 0 and all(info.in_use == 0 for info in registry.resident.values())
    finally:
        engine.stop()


def test_block_manager_shares_evicts_lru_and_counts():
    blocks = BlockManager(num_blocks=4, block_size=2)
    first, second = BlockTable(), BlockTable()
    assert blocks.match_prefix(first, [1, 2, 3, 4, 5]) == 0
    assert blocks.grow(first, 5) and len(first.blocks) == 3
    blocks.register(first, [1, 2, 3, 4, 5], 5)
    assert len(first.hashes) == 2  # the third block is not full
    assert blocks.match_prefix(second, [1, 2, 3, 4, 9]) == 4 and second.blocks == first.blocks[:2]
    assert blocks.ref_counts[first.blocks[0]] == 2
    blocks.free(first)
    blocks.free(second)
    blocks.check()
    assert blocks.num_free == 4 and len(blocks.cached) == 2  # freed but still cached
    other = BlockTable(identity="a#1")
    assert blocks.match_prefix(other, [1, 2, 3, 4, 5]) == 0  # another adapter load: no reuse
    assert blocks.grow(other, 8) and len(blocks.cached) == 0  # the pool needed every block: cache evicted
    assert not blocks.grow(BlockTable(), 1)
    blocks.free(other)
    blocks.check()


def test_a_request_that_ends_in_its_prefill_step_still_caches_its_prompt(setup):  # noqa: F811
    root, _ = setup
    engine, _ = make_engine(root)
    try:
        prompt = prompts(4)[0]  # 40 tokens: two full blocks
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        first = run(engine, [(None, prompt)], one, prefix="p")["p0"]
        second = run(engine, [(None, prompt)], one, prefix="q")["q0"]
        assert first[-1].cached_tokens == 0 and second[-1].cached_tokens == 32
        assert tokens(first) == tokens(second)
    finally:
        engine.stop()
