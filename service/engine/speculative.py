"""Speculative decoding: a small draft model proposes k tokens, the target verifies them in one forward.

Per decode row and round: the draft catches up on the tokens it has not seen, proposes k tokens one
at a time; the target runs once over [last token, d1..dk] and yields k+1 distributions. Greedy rows
accept drafts while they equal the target's argmax, then take the target's token. Sampled rows use
the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept d_i with probability
min(1, p(d_i) / q(d_i)), on rejection draw from norm(max(0, p - q)), and after k acceptances draw a
bonus token from p_{k+1}; the output then follows the target's distribution exactly.

A draft whose logits are not finite proposes from a uniform distribution in sampled rows and its
argmax in greedy ones (the target still decides, so the output stays exact); the target's own
non-finite rows are failed by the worker.

KV caches need no copying on rejection: a sequence's cached-token count is cut back, the stale
entries past it are masked out and later overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models import sampling
from models.kv_cache import PagedKVCache
from service.engine.block_manager import BlockManager, BlockTable
from service.engine.compiled_decode import CompiledDecode
from service.engine.runner import ModelRunner
from service.engine.sequence import Sequence
from service.engine.types import SamplingParams


@dataclass(frozen=True)
class SpeculativeConfig:
    num_draft_tokens: int = 4  # k: drafts proposed per round
    method: str = "draft"  # "draft": a smaller model proposes; "ngram": copied from the sequence's history
    ngram_max: int = 4  # n-gram method: the longest suffix looked up in the history
    ngram_min: int = 1  # and the shortest


@dataclass
class DraftState:
    table: BlockTable = field(default_factory=BlockTable)  # the draft's own KV blocks for this sequence
    num_computed: int = 0  # tokens of the sequence whose keys/values the draft cache holds


@dataclass
class RoundResult:
    new_tokens: list[int]  # accepted drafts followed by the target's own token
    num_accepted: int  # how many drafts were accepted


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution a request uses, from raw finite logits (..., V)."""
    return sampling.probabilities(logits, params.temperature, params.top_k, params.top_p)


@dataclass
class SpeculativeDecoder:
    draft: ModelRunner
    config: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    states: dict[int, DraftState] = field(default_factory=dict)  # id(sequence) -> draft-side state

    blocks: BlockManager | None = None  # the draft's pool (no prefix caching: drafts are cheap to recompute)

    @classmethod
    def build(
        cls,
        draft_model,
        num_blocks: int,
        block_size: int,
        config: SpeculativeConfig,
        compile_max_batch: int = 0,
        autotune: bool = False,
    ) -> SpeculativeDecoder:
        """compile_max_batch > 0: the draft's forwards (one token, or a short catch-up chunk, per sequence) run
        through its own compiled decode graph, buckets up to that many tokens."""
        cache = PagedKVCache(draft_model.config, num_blocks, block_size, draft_model.dtype, draft_model.device)
        compiled = None
        if compile_max_batch > 0 and CompiledDecode.supports(draft_model):
            # The draft's greedy steps after the first (which catches up on the round's accepted tokens) run
            # chained in one graph call.
            steps = config.num_draft_tokens - 1
            compiled = CompiledDecode(draft_model, cache, compile_max_batch, autotune=autotune, chain_steps=steps)
        runner = ModelRunner(draft_model, cache, compiled_decode=compiled)
        return cls(runner, config, blocks=BlockManager(num_blocks, block_size, False))

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(id(seq), None)
        if state is not None:
            self.blocks.free(state.table)

    def _state(self, seq: Sequence) -> DraftState:
        if id(seq) not in self.states:
            self.states[id(seq)] = DraftState()
        return self.states[id(seq)]

    def propose(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[Tensor | None]]:
        """k draft tokens per sequence, and the draft distributions q (k, V) of sampled rows (None: greedy)."""
        k = self.config.num_draft_tokens
        states = [self._state(s) for s in seqs]
        history = [s.request.prompt_ids + s.output_ids for s in seqs]
        feed = [h[st.num_computed :] for h, st in zip(history, states)]  # catch-up: >= 1 token each
        drafts: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[Tensor]] = [[] for _ in seqs]
        sampled = any(not seq.request.params.greedy for seq in seqs)
        for step in range(k):
            if step == 1 and not sampled and self._chains(states, k - 1):
                self._propose_chained(states, drafts, k - 1)
                break
            self._grow(states, [len(tokens) for tokens in feed])
            tables = [st.table.blocks for st in states]
            logits, _ = self.draft.forward(feed, tables, [st.num_computed for st in states])
            # Greedy rows take the argmax even of a broken row (any token is a valid proposal: the target
            # decides); sampled rows need a distribution, so a broken draft proposes uniformly.
            greedy_tokens = logits.argmax(dim=-1).tolist()  # (B,)
            broken = sampling.nonfinite_rows(logits).tolist() if sampled else None  # (B,)
            for i, (seq, st) in enumerate(zip(seqs, states)):
                st.num_computed += len(feed[i])
                params = seq.request.params
                if params.greedy:
                    token = greedy_tokens[i]
                else:
                    row = torch.zeros_like(logits[i]) if broken[i] else logits[i]
                    q = probabilities(row, params)  # (V,)
                    token = sampling.draw(q, seq.generator.generator)
                    q_rows[i].append(q)
                drafts[i].append(token)
            feed = [[d[-1]] for d in drafts]
        q_out = [torch.stack(q) if q else None for q in q_rows]
        return drafts, q_out

    def _grow(self, states: list[DraftState], new_tokens: list[int]) -> None:
        """Blocks for each row's next new_tokens in the draft's pool."""
        for st, count in zip(states, new_tokens):
            if not self.blocks.grow(st.table, st.num_computed + count):
                raise RuntimeError("the draft model's KV pool is full")  # sized so this cannot happen

    def _chains(self, states: list[DraftState], steps: int) -> bool:
        """The draft's compiled chain takes these (greedy) rows, their blocks grown for its steps."""
        compiled = self.draft.compiled_decode
        if compiled is None:
            return False
        self._grow(states, [steps] * len(states))
        return compiled.accepts_chain([st.table.blocks for st in states])

    def _propose_chained(self, states: list[DraftState], drafts: list[list[int]], steps: int) -> None:
        """The remaining greedy proposals in one chained graph call, from each row's first draft."""
        tables = [st.table.blocks for st in states]
        chained = self.draft.compiled_decode.run_greedy_chain(
            [d[-1] for d in drafts], tables, [st.num_computed for st in states]
        )
        for st, row, proposed in zip(states, drafts, chained):
            row.extend(proposed)
            st.num_computed += steps

    def accept(self, seq: Sequence, drafts: list[int], target_logits: Tensor, q: Tensor | None) -> RoundResult:
        """target_logits (k+1, V) at [last token, d1..dk]; returns the tokens to append."""
        params = seq.request.params
        new: list[int] = []
        if params.greedy:
            target = target_logits.argmax(dim=-1).tolist()  # (k+1,)
            for i, draft in enumerate(drafts):
                if draft != target[i]:
                    return self._finish_round(seq, new, target[i])
                new.append(draft)
            return self._finish_round(seq, new, target[len(drafts)])
        p = probabilities(target_logits, params)  # (k+1, V)
        generator = seq.generator.generator
        for i, draft in enumerate(drafts):
            ratio = p[i, draft] / q[i, draft].clamp_min(1e-20)
            if torch.rand((), generator=generator) < ratio.clamp(max=1.0):
                new.append(draft)
                continue
            residual = (p[i] - q[i]).clamp_min(0.0)
            residual = residual / residual.sum() if residual.sum() > 0 else p[i]
            return self._finish_round(seq, new, sampling.draw(residual, generator))
        bonus = sampling.draw(p[len(drafts)], generator)
        return self._finish_round(seq, new, bonus)

    def _finish_round(self, seq: Sequence, accepted: list[int], token: int) -> RoundResult:
        state = self.states[id(seq)]
        # The draft cache is valid for the history before this round's drafts plus the accepted ones.
        valid = seq.total_len() + len(accepted)
        state.num_computed = min(state.num_computed, valid)
        self.blocks.shrink(state.table, state.num_computed + 1)
        return RoundResult([*accepted, token], len(accepted))
