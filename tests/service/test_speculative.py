"""Speculative decoding: greedy output identical to the target alone; sampling follows the target's distribution."""

from __future__ import annotations

import threading

import torch

from models import SamplingConfig, generate
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, SchedulerConfig, ServedModel
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.sampler import RequestGenerator
from service.engine.sequence import Sequence
from service.engine.speculative import SpeculativeConfig, SpeculativeDecoder
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer


def run(engine, requests):
    out = {r.request_id: [] for r in requests}
    stats = []
    done = threading.Event()
    finished = set()

    def on_event(event):
        out[event.request_id].extend(event.token_ids)
        if event.finish_reason:
            finished.add(event.request_id)
            if len(finished) == len(requests):
                done.set()

    engine.on_step = stats.append
    for r in requests:
        engine.submit(r, on_event)
    assert done.wait(60)
    return out, stats


def spec_engine(target, draft, tokenizer, k=3, method="draft", compile_decode=False):
    engine = Engine(EngineConfig(SchedulerConfig(compile_decode=compile_decode, max_batch_size=8)))
    engine.add_model(
        ServedModel(
            "t",
            target,
            tokenizer,
            max_model_len=96,
            draft_model=draft,
            speculative=SpeculativeConfig(num_draft_tokens=k, method=method),
        )
    )
    engine.start()
    return engine


def test_greedy_speculative_output_is_identical_to_the_target_alone():
    tokenizer = tiny_tokenizer()
    target, draft = tiny_model(tokenizer.vocab_size, seed=1), tiny_model(tokenizer.vocab_size, seed=2)
    engine = spec_engine(target, draft, tokenizer)
    try:
        prompts = [tokenizer.encode(t) for t in ["hello world", "the lazy dog", "def f"]]
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        requests = [GenerationRequest(f"r{i}", "t", p, params) for i, p in enumerate(prompts)]
        out, stats = run(engine, requests)
    finally:
        engine.stop()
    for r in requests:
        assert out[r.request_id] == generate(target, [r.prompt_ids], SamplingConfig(max_new_tokens=20))[0]
    assert sum(s.spec_draft_tokens for s in stats) > 0
    assert engine.workers["t"].speculative.blocks.num_held == 0 and engine.workers["t"].blocks.num_held == 0


def test_a_perfect_draft_is_always_accepted():
    tokenizer = tiny_tokenizer()
    target = tiny_model(tokenizer.vocab_size, seed=1)
    engine = spec_engine(target, tiny_model(tokenizer.vocab_size, seed=1), tokenizer, k=4)
    try:
        request = GenerationRequest(
            "r", "t", tokenizer.encode("hello world"), SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
        )
        out, stats = run(engine, [request])
    finally:
        engine.stop()
    assert len(out["r"]) == 21
    drafted = sum(s.spec_draft_tokens for s in stats)
    assert drafted > 0 and sum(s.spec_accepted_tokens for s in stats) == drafted
    assert len(tokenizer.encode("hello world")) > 1  # so the first token comes from a plain prefill step
    assert len([s for s in stats if s.spec_draft_tokens]) == 4  # then 4 rounds of 5 tokens


def test_a_draft_with_nan_logits_cannot_change_or_fail_the_output():
    """Greedy rows propose the broken draft's argmax, sampled rows a uniform draw: the target still decides."""
    tokenizer = tiny_tokenizer()
    target, draft = tiny_model(tokenizer.vocab_size, seed=1), tiny_model(tokenizer.vocab_size, seed=2)
    with torch.no_grad():
        draft.lm_head.weight.fill_(float("nan"))
    engine = spec_engine(target, draft, tokenizer)
    prompt = tokenizer.encode("hello world")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    requests = [GenerationRequest("greedy", "t", prompt, greedy), GenerationRequest("sampled", "t", prompt, sampled)]
    try:
        out, stats = run(engine, requests)
    finally:
        engine.stop()
    assert out["greedy"] == generate(target, [prompt], SamplingConfig(max_new_tokens=12))[0]
    assert len(out["sampled"]) == 12
    assert sum(s.spec_draft_tokens for s in stats) > 0


def test_acceptance_rule_reproduces_the_target_distribution():
    """Draw d ~ q, apply the rule: the first emitted token must be distributed as p (not q)."""
    p_logits = torch.tensor([[2.0, 0.5, 0.0, -1.0, 1.0], [0.0] * 5])  # (k+1, V) with k = 1
    q = torch.softmax(torch.tensor([[0.0, 2.0, 1.0, 0.0, -2.0]]), dim=-1)  # (k, V)
    params = SamplingParams(temperature=1.0, max_tokens=4)
    seq = Sequence(
        GenerationRequest("x", "t", [1], params),
        lambda e: None,
        IncrementalDetokenizer(tiny_tokenizer()),
        RequestGenerator(0),
    )
    from service.engine.block_manager import BlockManager
    from service.engine.speculative import DraftState

    decoder = SpeculativeDecoder(draft=None, config=SpeculativeConfig(num_draft_tokens=1), blocks=BlockManager(4, 16))
    decoder.states[id(seq)] = DraftState()
    draws = torch.Generator().manual_seed(1)
    trials = 3000
    counts = torch.zeros(5)
    for _ in range(trials):
        draft = int(torch.multinomial(q[0], 1, generator=draws))
        counts[decoder.accept(seq, [draft], p_logits, q).new_tokens[0]] += 1
    expected = torch.softmax(p_logits[0], dim=-1)
    assert (counts / trials - expected).abs().max() < 0.035
    assert (counts / trials - q[0]).abs().max() > 0.1  # and visibly not the draft's
