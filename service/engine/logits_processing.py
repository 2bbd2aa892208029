"""Per-row logits processing between the model's forward and the sampler: the one seam for every
request control that changes which token is chosen or records how likely it was.

`process(seqs, logits)` gets the finite raw logits (S, V) of the rows about to sample and returns the
logits to sample from; `observe(seq, token, raw_row)` runs after each row's token is chosen (state
that advances per token: penalty counts, a grammar's position, logprobs). `needs_processing(seq)`
says whether a row uses any of it; such rows do not speculate (a verified draft token would skip
`process`/`observe`), so their results are exactly those of plain decoding.

Each control lives in its own module and is called from here (penalties and logit bias, guided
decoding, logprobs); with none of them requested this module costs one check per row.
"""

from __future__ import annotations

from torch import Tensor

from service.engine.sequence import Sequence


def needs_processing(seq: Sequence) -> bool:
    """True when the row uses a control that must see every token (so it must not speculate)."""
    return False


def process(seqs: list[Sequence], logits: Tensor) -> Tensor:
    """logits (S, V) raw and finite -> logits (S, V) to sample from (may be the same tensor)."""
    return logits


def observe(seq: Sequence, token: int, raw_logits: Tensor) -> None:
    """After `token` was chosen for `seq` from raw_logits (V,): advance per-token state."""
