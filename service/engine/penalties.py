"""Penalties, logit bias and min_tokens: the controls that rewrite a row's logits before sampling.

Semantics, as OpenAI and vLLM define them (logits of one row, V entries):

- `repetition_penalty` p (vLLM / Hugging Face): every token seen in the prompt or the output so far
  gets logit / p when its logit is positive, logit x p otherwise (p > 1 discourages repeats);
- `frequency_penalty` f and `presence_penalty` r (OpenAI), over generated tokens only:
  logit - f x count(token) - r x [count(token) > 0];
- `logit_bias` (OpenAI): bias[token] is added to the logit (-100 bans a token in practice, +100 forces it);
- `min_tokens` (vLLM): EOS and `stop_token_ids` get -inf until that many tokens were generated.

`apply` is vectorised over the rows that use any of them (one gather, a few (R, V) operations, one
scatter); a batch where no row does returns the logits untouched, so plain decoding pays one check
per row. Per-row state (`PenaltyState`: output token counts, the prompt's token set, the dense bias)
lives on the sequence, is built at its first use and advanced by `observe` after each chosen token;
it survives preemption (the output is kept, so are its counts). Every value the schema accepts is safe:
the result is finite except the min_tokens mask (-inf), so the sampler's max-shift never meets inf - inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.sequence import Sequence

MIN_REPETITION_PENALTY = 1e-30  # the schema takes any p > 0; below this float32 division overflows


@dataclass
class PenaltyState:
    counts: Tensor  # (V,) float32: times each token was generated
    seen_in_prompt: Tensor | None  # (V,) bool: tokens of the prompt (repetition_penalty only)
    bias: Tensor | None  # (V,) float32: logit_bias as a dense row (None: no bias)


def state_of(seq: Sequence, vocab: int, device: torch.device) -> PenaltyState:
    """The row's state, built on first use from its parameters (and its output so far, after a restart)."""
    state = seq.penalty_state
    if state is None:
        params = seq.request.params
        counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if seq.output_ids:
            counts.index_add_(
                0, torch.tensor(seq.output_ids, device=device), torch.ones(len(seq.output_ids), device=device)
            )
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(seq.request.prompt_ids, device=device)] = True
        bias = None
        if params.logit_bias:
            bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids, values = zip(*params.logit_bias)
            bias[torch.tensor(ids, device=device)] = torch.tensor(values, dtype=torch.float32, device=device)
        state = seq.penalty_state = PenaltyState(counts, seen, bias)
    return state  # type: ignore[return-value]


def apply(seqs: list[Sequence], logits: Tensor, eos_ids: tuple[int, ...] = ()) -> Tensor:
    """logits (S, V) -> logits (S, V) with each row's penalties, bias and min_tokens mask applied.

    The input is never changed in place (the raw logits still give the logprobs); rows without any of
    these controls are copied unchanged."""
    rows = [i for i, seq in enumerate(seqs) if seq.request.params.penalised]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    out = logits.to(torch.float32, copy=True)  # (S, V)
    index = torch.tensor(rows, device=device)
    sub = out.index_select(0, index)  # (R, V)
    picked = [seqs[i] for i in rows]
    params = [seq.request.params for seq in picked]
    states = [state_of(seq, vocab, device) for seq in picked]
    counts = torch.stack([s.counts for s in states])  # (R, V)
    if any(p.repetition_penalty != 1.0 for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)  # (R, 1)
        rep = rep.clamp(min=MIN_REPETITION_PENALTY)  # a denormal penalty is 0 in float32: logit / 0 = inf
        no_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen = torch.stack([s.seen_in_prompt if s.seen_in_prompt is not None else no_prompt for s in states])
        seen = seen | (counts > 0)  # (R, V)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)  # (R, 1)
        pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)  # (R, 1)
        sub = sub - freq * counts - pres * (counts > 0).float()
    if any(s.bias is not None for s in states):
        zeros = torch.zeros(vocab, dtype=torch.float32, device=device)
        sub = sub + torch.stack([s.bias if s.bias is not None else zeros for s in states])  # (R, V)
    for r, (seq, p) in enumerate(zip(picked, params)):
        if len(seq.output_ids) < p.min_tokens:
            banned = [t for t in (*eos_ids, *p.stop_token_ids) if 0 <= t < vocab]
            if banned:
                sub[r, banned] = float("-inf")
    # Finite for the sampler whatever the values (a huge logit / a tiny penalty): +inf -> float32 max.
    sub = sub.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    out.index_copy_(0, index, sub)
    return out


def observe(seq: Sequence, token: int) -> None:
    """Count the chosen token (frequency and presence penalties, repetition over the output)."""
    state = seq.penalty_state
    if state is not None:
        state.counts[token] += 1  # type: ignore[attr-defined]
