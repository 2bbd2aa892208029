"""Penalties, logit bias, min_tokens, stop_token_ids, min-p and logprobs in the engine, each checked
against a hand-computed expectation from full forwards of the same tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling import probabilities, sample_tokens
from service.engine import GenerationRequest, SamplingParams
from tests.service.engine_fixtures import tiny_tokenizer
from tests.service.test_engine import make_engine, run_all, tokens_of

PROMPT = "hello world, the quick brown fox"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    engine = make_engine(tokenizer, max_tokens_per_step=7)  # chunked prefill: prompts span several steps
    yield engine
    engine.stop()


def full_logits(engine, ids: list[int]) -> torch.Tensor:
    """(T, V) float32 logits of one full (uncached) forward."""
    model = engine.workers["tiny"].served.model
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def expected_greedy(engine, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """Greedy decoding with the penalty formulas written out per token (no vectorisation)."""
    out: list[int] = []
    for _ in range(n):
        row = full_logits(engine, prompt + out)[-1].tolist()
        for token in set(prompt + out):
            if params.repetition_penalty != 1.0:
                p = params.repetition_penalty
                row[token] = row[token] / p if row[token] > 0 else row[token] * p
        for token in set(out):
            row[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        for token, bias in params.logit_bias:
            row[token] += bias
        out.append(max(range(len(row)), key=row.__getitem__))
    return out


def run_one(engine, prompt, params, rid="r"):
    return run_all(engine, [GenerationRequest(rid, "tiny", prompt, params)])[rid]


@pytest.mark.parametrize(
    "controls",
    [
        dict(frequency_penalty=1.5),
        dict(presence_penalty=2.0),
        dict(repetition_penalty=1.8),
        dict(repetition_penalty=0.3, frequency_penalty=-2.0, presence_penalty=0.5),
        dict(logit_bias=((5, 8.0), (40, -100.0))),
    ],
)
def test_penalties_and_bias_match_the_formulas(engine, tokenizer, controls):
    prompt = tokenizer.encode(PROMPT)
    base = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    plain = tokens_of(run_one(engine, prompt, base))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, **controls)
    got = tokens_of(run_one(engine, prompt, params))
    assert got == expected_greedy(engine, prompt, 10, params)
    assert got != plain  # the control changed the tokens


def test_penalised_row_batched_with_plain_rows(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, frequency_penalty=2.0)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    events = run_all(
        engine,
        [GenerationRequest("p", "tiny", prompt, params), GenerationRequest("q", "tiny", prompt, plain)],
    )
    assert tokens_of(events["p"]) == expected_greedy(engine, prompt, 8, params)
    assert tokens_of(events["q"]) == expected_greedy(engine, prompt, 8, plain)


def test_min_tokens_masks_eos_and_stop_token_ids(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    eos = tokenizer.eos_token_id
    engine.workers["tiny"].eos, engine.workers["tiny"].eos_ids = {eos}, (eos,)
    try:
        forced = SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=5)
        events = run_one(engine, prompt, forced)
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 5
        assert tokens_of(events)[-1] == eos and eos not in tokens_of(events)[:-1]
        stop_id = tokenizer.encode(" the")[-1]
        stopped = SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((stop_id, 100.0),))
        events = run_one(engine, prompt, stopped.__class__(**{**stopped.__dict__, "stop_token_ids": (stop_id,)}))
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 0
        later = SamplingParams(
            max_tokens=20, temperature=0.0, logit_bias=((stop_id, 100.0),), stop_token_ids=(stop_id,), min_tokens=3
        )
        events = run_one(engine, prompt, later)
        assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 3
    finally:
        engine.workers["tiny"].eos, engine.workers["tiny"].eos_ids = set(), ()


def test_logprobs_are_the_raw_log_softmax(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=3, frequency_penalty=1.0)
    events = run_one(engine, prompt, params)
    out = tokens_of(events)
    logprobs = [lp for e in events for lp in (e.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == out
    for i, lp in enumerate(logprobs):
        ref = torch.log_softmax(full_logits(engine, prompt + out[:i])[-1], dim=-1)
        assert abs(lp.logprob - float(ref[out[i]])) < 1e-4
        top = torch.topk(ref, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist())) < 1e-4


def test_prompt_logprobs_every_position_despite_prefix_cache_and_chunks(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT * 3)  # several blocks, several prefill chunks
    assert len(prompt) > 40
    run_one(engine, prompt, SamplingParams(max_tokens=2, temperature=0.0), "warm")  # its blocks get cached
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=2, logprobs=2)
    events = run_one(engine, prompt, params, "echo")
    assert events[-1].finish_reason == "length" and tokens_of(events) == []
    scored = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    assert len(scored) == len(prompt) and scored[0] is None
    ref = torch.log_softmax(full_logits(engine, prompt), dim=-1)  # (T, V)
    for j in range(1, len(prompt)):
        assert scored[j].token_id == prompt[j]
        assert abs(scored[j].logprob - float(ref[j - 1, prompt[j]])) < 1e-4
        assert [t for t, _ in scored[j].top] == torch.topk(ref[j - 1], 2).indices.tolist()
    assert engine.workers["tiny"].blocks.num_held == 0


def test_prompt_logprobs_with_generation(engine, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    events = run_one(engine, prompt, params)
    assert sum(e.prompt_logprobs is not None for e in events) == 1
    assert tokens_of(events) == expected_greedy(engine, prompt, 4, SamplingParams())


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.tensor([2.0, 2.0 + math.log(0.6), 2.0 + math.log(0.4), -1.0])
    probs = probabilities(logits, 1.0, min_p=0.5)
    assert probs[0] > 0 and probs[1] > 0 and probs[2] == 0 and probs[3] == 0
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    # min_p 1 is the best token only, with any temperature; min_p 0 changes nothing
    gen = torch.Generator().manual_seed(0)
    assert sample_tokens(logits.unsqueeze(0), [2.0], [0], [1.0], [gen], [1.0]) == [0]
    assert torch.equal(probabilities(logits, 1.0), probabilities(logits, 1.0, min_p=0.0))


def test_extreme_penalties_stay_samplable(engine, tokenizer):
    """The fuzzer's case: a denormal repetition_penalty (0 in float32) must not make inf logits."""
    prompt = tokenizer.encode(PROMPT)
    for extra in (dict(repetition_penalty=2.9e-308), dict(repetition_penalty=10.0, frequency_penalty=-2.0)):
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, ignore_eos=True, **extra)
        events = run_one(engine, prompt, params)
        assert events[-1].finish_reason == "length" and events[-1].error is None


def test_rows_without_controls_are_untouched(engine, tokenizer):
    """No penalised row: the logits tensor itself comes back (no copy); a penalised row leaves the others equal."""
    from service.engine import logits_processing
    from service.engine.detokenizer import IncrementalDetokenizer
    from service.engine.sequence import Sequence

    def seq(params):
        request = GenerationRequest("x", "tiny", [1, 2, 3], params)
        return Sequence(request, lambda event: None, IncrementalDetokenizer(tokenizer), None)

    logits = torch.randn(2, 50)
    plain = [seq(SamplingParams()), seq(SamplingParams(logprobs=2))]
    assert logits_processing.process(plain, logits) is logits
    mixed = [seq(SamplingParams()), seq(SamplingParams(logit_bias=((3, 5.0),)))]
    out = logits_processing.process(mixed, logits)
    assert torch.equal(out[0], logits[0]) and out[1, 3] == logits[1, 3] + 5.0
