"""Sparse Mixture-of-Experts feed-forward (Mixtral layout) with grouped dispatch, and its losses.

Routing: softmax over expert logits, top-k experts per token, weights renormalised over the chosen
k (as Mixtral does). Dispatch: the N*k (token, expert) slots are sorted by expert so every expert
runs once on one contiguous segment of rows; results are weighted and scattered back with one
index_add. There is no Python loop over tokens, only over experts.

Losses for training: the Switch Transformer load-balancing loss and the ST-MoE router z-loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig


class ExpertMLP(nn.Module):
    """One expert: SwiGLU with Mixtral's tensor names (w1 gate, w3 up, w2 down)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    expert_index: Tensor  # (N, k) chosen experts per token
    expert_weight: Tensor  # (N, k) renormalised routing weights
    router_logits: Tensor  # (N, E)


def route(router_logits: Tensor, top_k: int, dtype: torch.dtype) -> Routing:
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)  # (N, E)
    weight, index = torch.topk(probs, top_k, dim=-1)  # (N, k)
    weight = (weight / weight.sum(dim=-1, keepdim=True)).to(dtype)
    return Routing(index, weight, router_logits)


def grouped_dispatch(x: Tensor, routing: Routing, experts: nn.ModuleList) -> tuple[Tensor, Tensor]:
    """Run each expert once on its contiguous block of routed rows. x (N, H) -> (out (N, H), counts (E,))."""
    n, top_k = routing.expert_index.shape
    flat_expert = routing.expert_index.reshape(-1)  # (N*k,)
    order = torch.argsort(flat_expert, stable=True)  # slot order grouped by expert
    token_of_slot = order // top_k  # (N*k,)
    counts = torch.bincount(flat_expert, minlength=len(experts))  # (E,)
    rows = x[token_of_slot]  # (N*k, H), grouped by expert
    weights = routing.expert_weight.reshape(-1)[order]  # (N*k,)
    outputs = torch.empty_like(rows)
    start = 0
    for expert, count in zip(experts, counts.tolist(), strict=True):
        if count:
            end = start + count
            outputs[start:end] = expert(rows[start:end])
            start = end
    outputs = outputs * weights[:, None]
    out = torch.zeros_like(x).index_add_(0, token_of_slot, outputs)  # (N, H)
    return out, counts


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertMLP(config.hidden_size, config.intermediate_size) for _ in range(config.num_local_experts)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Routing, Tensor]:
        # x (B, T, H) -> out (B, T, H), routing over the B*T tokens, expert counts (E,)
        b, t, h = x.shape
        flat = x.reshape(b * t, h)  # (N, H)
        routing = route(self.gate(flat), self.top_k, flat.dtype)
        out, counts = grouped_dispatch(flat, routing, self.experts)
        return out.view(b, t, h), routing, counts


def load_balancing_loss(router_logits: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e, generalised to top-k.

    f_e: fraction of the N*k routed slots sent to expert e; P_e: mean router probability of e.
    Equals 1.0 under perfectly uniform routing and rises to num_experts / k when every token is sent,
    with all the router's probability, to the same k experts.
    router_logits (N, E); expert_index (N, k).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    one_hot = F.one_hot(expert_index, num_experts).float()  # (N, k, E)
    fraction = one_hot.mean(dim=(0, 1))  # (E,) sums to 1
    mean_prob = probs.mean(dim=0)  # (E,)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2. router_logits (N, E)."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()
