"""The shared sampler: every value the HTTP schema accepts yields a valid token id (property tests)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.sampling import (
    GREEDY_TEMPERATURE,
    filter_logits,
    is_greedy,
    nonfinite_rows,
    probabilities,
    sample_tokens,
)

VOCAB = 17
finite_logit = st.floats(allow_nan=False, allow_infinity=False, width=32)
logit_rows = st.lists(st.one_of(finite_logit, st.just(float("-inf"))), min_size=VOCAB, max_size=VOCAB).filter(
    lambda row: any(math.isfinite(x) for x in row)
)
temperature = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0), st.just(1e-40), st.just(5e-324))
top_p = st.one_of(st.floats(min_value=5e-324, max_value=1.0, exclude_min=False), st.just(5e-324), st.just(1.0))
top_k = st.integers(min_value=-1, max_value=VOCAB + 5)


@settings(max_examples=400, deadline=None)
@given(
    rows=st.lists(logit_rows, min_size=1, max_size=4),
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    seed=st.integers(0, 2**31),
)
def test_sampling_always_returns_a_valid_token(rows, temperature, top_p, top_k, seed):
    logits = torch.tensor(rows, dtype=torch.float32)  # (B, V)
    assert not nonfinite_rows(logits).any()
    k = max(top_k, 0)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(rows))]
    ids = sample_tokens(logits, [temperature] * len(rows), [k] * len(rows), [top_p] * len(rows), generators)
    for row, token in zip(logits, ids):
        assert 0 <= token < VOCAB
        assert math.isfinite(float(row[token])), "a masked (-inf) token was drawn"
        if is_greedy(temperature, k):
            assert row[token] == row.max()


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, temperature=st.floats(min_value=GREEDY_TEMPERATURE, max_value=2.0), top_p=top_p, top_k=top_k)
def test_probabilities_are_a_distribution_that_keeps_the_best_token(row, temperature, top_p, top_k):
    logits = torch.tensor(row, dtype=torch.float32)
    probs = probabilities(logits, temperature, max(top_k, 0), top_p)  # (V,)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert abs(float(probs.sum()) - 1.0) < 1e-4
    assert probs[logits == logits.max()].sum() > 0  # a best token (ties: any of them) always stays


def test_tiny_values_that_underflow_float32_are_greedy_or_top_1():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    assert is_greedy(1e-40) and is_greedy(0.0) and not is_greedy(GREEDY_TEMPERATURE)
    kept = filter_logits(logits, top_k=0, top_p=5e-324)  # 0.0 in float32
    assert torch.isfinite(kept).sum() == 1 and int(kept.argmax()) == 1
    gen = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, [1.0], [0], [5e-324], [gen]) == [1]
    assert sample_tokens(logits, [1e-40], [0], [1.0], [None]) == [1]


def test_nonfinite_rows_are_found():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 1.0], [nan, 1.0], [inf, 0.0], [-inf, -inf], [-inf, 3.0]])
    assert nonfinite_rows(logits).tolist() == [False, True, True, True, False]


def test_seeded_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = sample_tokens(logits[1:2], [0.9], [0], [0.95], [torch.Generator().manual_seed(7)])
    batched = sample_tokens(
        logits,
        [0.0, 0.9, 1.3],
        [0, 0, 5],
        [1.0, 0.95, 0.5],
        [None, torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
    )
    assert batched[1] == alone[0]
