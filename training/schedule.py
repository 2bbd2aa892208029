"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

`lr_factor(step)` multiplies every parameter group's base learning rate (each group keeps its own
multiplier from `training.optim`). Values, with W = warmup_steps and S = total_steps:

- step < W:        (step + 1) / W            (the first step already trains; step W-1 reaches 1.0)
- W <= step <= S:  m + (1 - m) * (1 + cos(pi * (step - W) / (S - W))) / 2, m = min_ratio
- step > S:        m

So the factor is exactly 1.0 at the end of warmup (step W) and exactly min_ratio at step S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WarmupCosine:
    warmup_steps: int
    total_steps: int
    # Floor of the cosine as a fraction of the peak LR (0.1 as in Chinchilla/LLaMA recipes).
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
