"""Evaluation: validation loss, bits per byte on held-out text, and MoE expert load balance.

Bits per byte = (sum over predicted tokens of -log2 p(token)) / (UTF-8 bytes those tokens stand for),
with the byte count of each token from `training.data.token_byte_lengths` (special tokens count 0
bytes but their loss is included, so EOS at document ends is paid for). It is comparable across
tokenizers, unlike per-token loss.

Expert load balance: tokens routed to each expert (top-k slots) summed over the validation windows;
reported per layer as max/mean: 1.0 is perfectly balanced, num_experts/top_k the worst (one expert
gets every token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _batches(windows: Tensor, batch_size: int):
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


@torch.no_grad()
def token_losses(model: nn.Module, windows: Tensor, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """(losses (N*T,) in nats, target ids (N*T,)) over (N, T+1) windows."""
    model.eval()
    device = next(model.parameters()).device
    losses, targets = [], []
    for chunk in _batches(windows, batch_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1]).logits.float()  # (b, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none")
        losses.append(loss.cpu())
        targets.append(chunk[:, 1:].reshape(-1).cpu())
    return torch.cat(losses), torch.cat(targets)


def val_loss(model: nn.Module, windows: Tensor, batch_size: int = 16) -> float:
    losses, _ = token_losses(model, windows, batch_size)
    return float(losses.mean())


def bits_per_byte(model: nn.Module, windows: Tensor, token_bytes: Tensor, batch_size: int = 16) -> float:
    losses, targets = token_losses(model, windows, batch_size)
    return float(losses.sum() / math.log(2) / token_bytes[targets].sum())


@torch.no_grad()
def expert_load(model: nn.Module, windows: Tensor, batch_size: int = 16) -> dict:
    """{"counts": [[tokens per expert] per layer], "max_over_mean": [per layer], "worst": max over layers}."""
    model.eval()
    device = next(model.parameters()).device
    total: Tensor | None = None
    for chunk in _batches(windows, batch_size):
        counts = model(chunk[:, :-1].to(device)).expert_counts  # (L, E)
        total = counts.cpu() if total is None else total + counts.cpu()
    ratio = (total.max(dim=1).values.float() / total.float().mean(dim=1)).tolist()
    return {"counts": total.tolist(), "max_over_mean": [round(r, 4) for r in ratio], "worst": round(max(ratio), 4)}
