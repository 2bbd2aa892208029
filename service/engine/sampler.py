"""The engine's side of sampling: each request's random stream, and a batch of rows to the shared sampler.

The sampling itself (greedy, temperature, top-k, top-p, min-p, robust to extreme values) lives in
`models.sampling`, shared with `models.generate` and speculative decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.sampling import sample_tokens
from service.engine.types import SamplingParams


class RequestGenerator:
    """The random stream of one request: seeded when the request gives a seed, else from the OS."""

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.seed()))


def sample(logits: Tensor, params: list[SamplingParams], generators: list[RequestGenerator | None]) -> list[int]:
    """logits (B, V) of finite rows -> one token id per row."""
    return sample_tokens(
        logits,
        [p.temperature for p in params],
        [p.top_k for p in params],
        [p.top_p for p in params],
        [g.generator if g is not None else None for g in generators],
        [p.min_p for p in params],
    )
