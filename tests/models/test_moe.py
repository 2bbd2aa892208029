"""The MoE block: grouped dispatch equals a per-token reference; routing renormalises; counts add up."""

from __future__ import annotations

import torch

from models import ModelConfig
from models.moe import SparseMoeBlock


@torch.no_grad()
def test_grouped_dispatch_equals_per_token_reference():
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="mixtral",
        vocab_size=16,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    block = SparseMoeBlock(config)
    for p in block.parameters():
        p.normal_(0, 0.2)
    x = torch.randn(3, 11, 24)
    out, routing, counts = block(x)
    flat = x.reshape(-1, 24)
    expected = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for slot in range(2):
            expert = block.experts[int(routing.expert_index[token, slot])]
            expected[token] += routing.expert_weight[token, slot] * expert(flat[token])
    assert torch.allclose(out.reshape(-1, 24), expected, atol=1e-5)
    assert torch.allclose(routing.expert_weight.sum(-1), torch.ones(33))
    assert int(counts.sum()) == 33 * 2
