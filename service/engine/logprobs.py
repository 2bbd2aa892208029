"""Log-probabilities returned to clients: the raw log-softmax of the model's logits (vLLM's default),
taken before temperature, penalties, logit bias and top-k/top-p/min-p truncation.

`score` gives, for rows of logits and the token each row chose (or the next prompt token, for
prompt logprobs), that token's logprob and the `top` most likely tokens with theirs, in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.engine.types import TokenLogprob


def score(logits: Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """logits (N, V) and one target token per row -> N TokenLogprobs with up to `top` alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    index = torch.tensor(targets, device=logits.device).unsqueeze(1)  # (N, 1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()  # (N,)
    if top <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(targets, chosen)]
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)  # (N, top)
    return [
        TokenLogprob(t, lp, tuple(zip(row_ids, row_values)))
        for t, lp, row_ids, row_values in zip(targets, chosen, ids.tolist(), values.tolist())
    ]
