"""Sampling helpers of models.generate: top-k / top-p filtering and seeded reproducibility."""

from __future__ import annotations

import math

import torch

from models import ModelConfig, SamplingConfig, generate
from models.decoder import CausalLM
from models.sampling import filter_logits


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.8)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), top_k=0, top_p=0.81)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    assert math.isclose(float(kept[0, 0]), math.log(0.5), rel_tol=1e-6)


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_seed_dependent():
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            initializer_range=0.3,
        )
    ).eval()
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    first = generate(model, [[1, 2, 3]], config)
    assert generate(model, [[1, 2, 3]], config) == first
    other = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=8))
    assert other != first


@torch.no_grad()
def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    ).eval()
    greedy = generate(model, [[5, 6]], SamplingConfig(max_new_tokens=10))[0]
    eos = greedy[3]
    stopped = generate(model, [[5, 6]], SamplingConfig(max_new_tokens=10, eos_token_ids=(eos,)))[0]
    assert stopped == greedy[: greedy.index(eos) + 1]
