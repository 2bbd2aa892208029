"""Per-row logits processing between the model's forward and the sampler: the one seam for every
request control that changes which token is chosen or records how likely it was.

`process(seqs, logits)` gets the finite raw logits (S, V) of the rows about to sample and returns the
logits to sample from; `observe(seq, token, raw_row)` runs after each row's token is chosen (state
that advances per token: penalty counts, a grammar's position, logprobs). `needs_processing(seq)`
says whether a row uses any of it; such rows do not speculate (a verified draft token would skip
`process`/`observe`), so their results are exactly those of plain decoding. `observe_prompt` scores
the prompt tokens of a sequence that asked prompt logprobs (echo), from its prefill logits at every
position (the runner computes them for such rows; the scheduler gives them no prefix-cache hit).

Each control lives in its own module and is called from here: penalties, logit bias and min_tokens
(`penalties.py`), logprobs (`logprobs.py`), structured output (`guided.py`: its mask is applied last,
so a complete grammar's EOS survives min_tokens); min-p is a sampling rule (`models/sampling.py`).
With none of them requested this module costs one check per row.
"""

from __future__ import annotations

from torch import Tensor

from service.engine import guided, penalties
from service.engine.logprobs import score
from service.engine.sequence import Sequence


def needs_processing(seq: Sequence) -> bool:
    """True when the row uses a control that must see every token (so it must not speculate)."""
    params = seq.request.params
    return params.penalised or params.logprobs is not None or params.min_p > 0.0 or params.guided is not None


def process(seqs: list[Sequence], logits: Tensor, eos_ids: tuple[int, ...] = ()) -> Tensor:
    """logits (S, V) raw and finite -> logits (S, V) to sample from (may be the same tensor; the input is
    never changed in place). eos_ids: the model's end tokens, masked for rows under min_tokens."""
    return guided.apply(seqs, penalties.apply(seqs, logits, eos_ids))  # the grammar's mask last: it wins


def observe(seq: Sequence, token: int, raw_logits: Tensor) -> None:
    """After `token` was chosen for `seq` from raw_logits (V,): advance per-token state."""
    params = seq.request.params
    if seq.penalty_state is not None:
        penalties.observe(seq, token)
    if params.guided is not None:
        guided.accept(seq, token)
    if params.logprobs is not None:
        seq.pending_logprobs.extend(score(raw_logits.unsqueeze(0), [token], params.logprobs))


def observe_prompt(seq: Sequence, start: int, logits: Tensor) -> None:
    """Score the prompt tokens this prefill chunk predicts: logits (T, V) at positions start..start+T-1
    (position p predicts token p + 1). Positions already scored (a recomputation) are skipped."""
    top = seq.request.params.prompt_logprobs
    if top is None:
        return
    if seq.prompt_logprobs is None:
        seq.prompt_logprobs = [None]  # the first prompt token has no logprob
    prompt = seq.request.prompt_ids
    first = max(len(seq.prompt_logprobs) - 1, start)  # next position to score
    last = min(start + logits.shape[0], len(prompt) - 1)  # positions in [first, last) predict prompt tokens
    if first < last:
        seq.prompt_logprobs.extend(score(logits[first - start : last - start], prompt[first + 1 : last + 1], top))
