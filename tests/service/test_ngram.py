"""Prompt-lookup (n-gram) speculation: the lookup, and greedy output identical to the target alone."""

from __future__ import annotations

from models import SamplingConfig, generate
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ServedModel
from service.engine.ngram import lookup
from service.engine.speculative import SpeculativeConfig
from tests.service.engine_fixtures import tiny_model, tiny_tokenizer
from tests.service.test_speculative import run


def test_lookup_copies_what_followed_the_latest_match_of_the_longest_suffix():
    history = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 6, 7, 2, 3, 4]
    assert lookup(history, 3, max_n=3, min_n=1) == [6, 7, 2]  # "2 3 4": its latest earlier run
    assert lookup([5, 6, 7, 8], 2, 3, 1) == []  # nothing repeats
    assert lookup([7, 7, 7], 4, 2, 1) == [7]  # overlapping runs
    assert lookup([1, 2, 1], 5, 1, 1) == [2, 1]
    assert lookup([300, 1, 2, 300], 2, 1, 1) == [1, 2]  # multi-byte token ids stay aligned
    assert lookup([1], 3, 2, 1) == [] and lookup([1, 2, 1], 0, 2, 1) == []


def test_ngram_speculation_gives_the_target_greedy_tokens_and_accepts_drafts():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size, seed=1)
    engine = Engine(EngineConfig())
    spec = SpeculativeConfig(num_draft_tokens=4, method="ngram")
    engine.add_model(ServedModel("t", model, tokenizer, max_model_len=128, speculative=spec))
    engine.start()
    try:
        texts = ["def f(x): return x + 1\ndef f(x): return", "hello world, hello world, hello", "the lazy dog"]
        prompts = [tokenizer.encode(t) for t in texts]
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        requests = [GenerationRequest(f"r{i}", "t", p, params) for i, p in enumerate(prompts)]
        out, stats = run(engine, requests)
        for i, prompt in enumerate(prompts):
            assert out[f"r{i}"] == generate(model, [prompt], SamplingConfig(max_new_tokens=40))[0]
        assert sum(s.spec_draft_tokens for s in stats) > 0
        assert sum(s.spec_accepted_tokens for s in stats) > 0  # a random model's greedy output repeats itself
        sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
        again, _ = run(engine, [GenerationRequest("s", "t", prompts[0], sampled)])
        assert len(again["s"]) == 30
        assert engine.workers["t"].blocks.num_held == 0
    finally:
        engine.stop()
