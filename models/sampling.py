"""The one sampling module: greedy, temperature, top-k, top-p, min-p, seeded draws, and non-finite detection.

Used by `models.generate`, the serving engine's sampler and speculative decoding, so every path
draws tokens the same way. Robust for every value the HTTP schema accepts (TGI and vLLM do the same):

- a temperature below `GREEDY_TEMPERATURE` (vLLM's 1e-5) is greedy, so 1e-40 never divides by ~0;
- logits are shifted by their row maximum before the temperature divides them, in float32, so a
  small temperature sends the others to -inf (probability 0) and never makes inf - inf = NaN;
- top-p always keeps the most likely token (a top_p that underflows to 0 in float32 is top-1);
- top-k keeps at least one token;
- min-p (vLLM's) drops tokens whose probability is below min_p x the best token's: after the shift the
  best token's scaled logit is 0, so the rule is `scaled < log(min_p)`, and the best token always stays.

A row whose logits hold NaN or +inf, or are all -inf, has no distribution: `nonfinite_rows` finds
such rows before sampling so the caller can fail that request alone. `probabilities` of a valid row
always sums to 1 with no NaN, so `torch.multinomial` cannot raise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

GREEDY_TEMPERATURE = 1e-5  # below this a temperature is greedy (vLLM's _SAMPLING_EPS)


def is_greedy(temperature: float, top_k: int = 0) -> bool:
    return temperature < GREEDY_TEMPERATURE or top_k == 1


def nonfinite_rows(logits: Tensor) -> Tensor:
    """(B, V) -> (B,) bool: rows with a NaN or +inf, or with no finite value at all.

    One reduction: a row's maximum is NaN if it holds a NaN, +inf if it holds +inf, -inf if all are -inf."""
    return ~torch.isfinite(logits.amax(dim=-1))


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf; the best token always stays.

    logits (B, V) float32, finite rows."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the better tokens
        drop = before >= top_p  # keeps the token that crosses top_p
        drop[..., 0] = False  # and always the best one (top_p may be ~0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def probabilities(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """The sampling distribution of finite logits (..., V), in float32; rows sum to 1.

    temperature must be >= GREEDY_TEMPERATURE (greedy rows take the argmax instead)."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    shifted = flat - flat.max(dim=-1, keepdim=True).values  # <= 0, the best token exactly 0
    scaled = shifted / max(temperature, GREEDY_TEMPERATURE)
    if top_k > 0 or top_p < 1.0:
        scaled = filter_logits(scaled, top_k, top_p)
    if min_p > 0.0:  # probability / best probability = exp(scaled): keep scaled >= log(min_p); 0 stays
        scaled = scaled.masked_fill(scaled < math.log(min(min_p, 1.0)), float("-inf"))
    return torch.softmax(scaled, dim=-1).reshape(logits.shape)


def draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token id from a distribution (V,) on its own random stream (CPU generators draw on the CPU)."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def sample_tokens(
    logits: Tensor,
    temperatures: list[float],
    top_ks: list[int],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    min_ps: list[float] | None = None,
) -> list[int]:
    """logits (B, V) of finite rows -> one token id per row, each row with its own settings and stream.

    Greedy rows are one argmax over the batch; a seeded row gets the same token whatever shares its batch."""
    chosen = logits.argmax(dim=-1).tolist()  # (B,)
    for i, temperature in enumerate(temperatures):
        if is_greedy(temperature, top_ks[i]):
            continue
        min_p = min_ps[i] if min_ps is not None else 0.0
        probs = probabilities(logits[i], temperature, top_ks[i], top_ps[i], min_p)  # (V,)
        chosen[i] = draw(probs, generators[i])
    return chosen
