"""Prompt-lookup (n-gram) speculation: drafts copied from the sequence's own history, no draft model.

vLLM's `ngram` method (prompt lookup decoding): take the last n tokens of the sequence (n from
`ngram_max` down to `ngram_min`), find their most recent earlier occurrence in the prompt or the
output, and propose the (up to) k tokens that followed it. Editing code, summarising or answering
from a document, the output repeats long runs of the prompt, and each verified run costs one forward.
A row with no match proposes nothing and decodes one token as usual.

Verification and acceptance are `SpeculativeDecoder`'s: greedy rows keep drafts while they equal the
target's argmax; sampled rows use the standard rule with the proposal as a point mass (q = 1 on the
drafted token), so the output still follows the target's distribution exactly.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.sequence import Sequence
from service.engine.speculative import RoundResult, SpeculativeDecoder


def lookup(history: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The up-to-k tokens that followed the latest earlier occurrence of history's last n tokens."""
    if k <= 0 or len(history) < 2:
        return []
    data = array("q", history).tobytes()  # 8 bytes a token: bytes.rfind searches in C
    width = 8
    for n in range(min(max_n, len(history) - 1), min_n - 1, -1):
        pattern = data[-n * width :]
        end = len(data) - width  # the match must end before the last token (it is the suffix itself)
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % width == 0:  # aligned on a token
                start = at // width + n
                follow = history[start : start + k]
                if follow:
                    return follow
                break
            end = at + len(pattern) - 1
    return []


@dataclass
class NgramDecoder(SpeculativeDecoder):
    vocab_size: int = 0

    def propose(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[Tensor | None]]:
        """Drafts per sequence (possibly none), and a point-mass q (k, V) for sampled rows (None: greedy)."""
        cfg = self.config
        drafts, q_out = [], []
        for seq in seqs:
            draft = lookup(seq.all_tokens(), cfg.num_draft_tokens, cfg.ngram_max, cfg.ngram_min)
            drafts.append(draft)
            if seq.request.params.greedy or not draft:
                q_out.append(None)
                continue
            q = torch.zeros(len(draft), self.vocab_size)  # (k, V)
            q[torch.arange(len(draft)), torch.tensor(draft)] = 1.0
            q_out.append(q)
        return drafts, q_out

    def release(self, seq: Sequence) -> None:  # no per-sequence state
        return None

    def _finish_round(self, seq: Sequence, accepted: list[int], token: int) -> RoundResult:
        return RoundResult([*accepted, token], len(accepted))
