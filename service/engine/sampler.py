"""Per-request sampling over a batch of logits: greedy, temperature, top-k, top-p, seed.

Greedy rows are one argmax over the batch. Sampled rows are filtered together, then each draws from
its own generator, so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.generate import filter_logits
from service.engine.types import SamplingParams


class RequestGenerator:
    """The random stream of one request: seeded when the request gives a seed, else from the OS."""

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.seed()))


def sample(logits: Tensor, params: list[SamplingParams], generators: list[RequestGenerator | None]) -> list[int]:
    """logits (B, V) -> one token id per row."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1)  # (B,)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return chosen.tolist()
    rows = torch.tensor(sampled_rows, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    scaled = logits[rows] / temperature[:, None]  # (S, V)
    for j, i in enumerate(sampled_rows):
        if params[i].top_k or params[i].top_p < 1.0:
            scaled[j] = filter_logits(scaled[j : j + 1], params[i].top_k, params[i].top_p)[0]
    probs = torch.softmax(scaled, dim=-1).cpu()  # (S, V)
    for j, i in enumerate(sampled_rows):
        generator = generators[i].generator if generators[i] is not None else None
        chosen[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
    return chosen.tolist()
