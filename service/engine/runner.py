"""Model runner: turns scheduled rows into forward passes over one model and its KV cache.

Decode rows (one new token each) and prefill rows (prompt chunks) run as separate forwards, so a long
prompt chunk does not pad every decode row to its length; within each kind, rows of very different
work (keys read, chunk length) run as separate forwards too (`group_rows`). Rows are ordered by adapter, so each LoRA
adapter's rows are one contiguous segment (see adapters/). Returns the last-position logits of the
rows that sample, and for prefill rows of sequences that asked prompt logprobs (echo) the logits at
every position of the chunk: those rows run in their own prefill forwards with all positions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.attention import AttentionMetadata
from models.decoder import CausalLM
from models.kv_cache import PagedKVCache
from service.engine.compiled_decode import CompiledDecode
from service.engine.scheduler import ScheduledRow

# (adapter name of each row, tokens per row) -> context manager that activates those adapters.
AdapterActivator = Callable[[list[str | None], int], AbstractContextManager]


# Rows of one forward are padded to its widest row (tokens, and keys read through the block tables), so
# a short row batched with a long one pays for the long one. Rows are grouped so that no row does less
# than 1/SPLIT_RATIO of its group's largest work; below the MIN_SPLIT_* work one more forward (its
# per-operation overhead) costs more than the padding saved.
SPLIT_RATIO = 2
MIN_SPLIT_DECODE = 512  # keys read per decode row
MIN_SPLIT_PREFILL = 64 * 1024  # new tokens x keys per prefill row


def decode_work(row: ScheduledRow) -> int:
    return row.context_len + 1


def prefill_work(row: ScheduledRow) -> int:
    return len(row.tokens) * (row.context_len + len(row.tokens))


def group_rows(
    rows: list[ScheduledRow], work: Callable[[ScheduledRow], int], min_split: int
) -> list[list[ScheduledRow]]:
    """Rows in forwards of similar work (largest first); one group when the work is small."""
    groups: list[list[ScheduledRow]] = []
    largest = 0
    for row in sorted(rows, key=work, reverse=True):
        if groups and (work(row) * SPLIT_RATIO >= largest or largest <= min_split):
            groups[-1].append(row)
        else:
            groups.append([row])
            largest = work(row)
    return groups


def scores_prompt(row: ScheduledRow) -> bool:
    """The row feeds prompt positions whose logits score a prompt token (a sequence asking prompt logprobs)."""
    seq = row.sequence
    return seq.request.params.prompt_logprobs is not None and row.context_len < seq.prompt_len - 1


@dataclass
class StepOutput:
    logits: dict[int, Tensor]  # id(sequence) -> (V,) logits at its last fed position, rows that sample only
    num_tokens: int
    expert_tokens: Tensor | None  # (layers, E) summed over this step's forwards
    prompt_logits: dict[int, Tensor] = field(default_factory=dict)  # id(sequence) -> (T, V), prompt-scoring rows


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        activate_adapters: AdapterActivator | None = None,
        compiled_decode: CompiledDecode | None = None,
    ) -> None:
        self.model = model
        # Forwards of short chunks go through the compiled graph when there is one (decode rows, speculative
        # verification, a draft's catch-up; adapter rows too, when it has the model's adapter registry);
        # prompts longer than its chunk limit, and batches beyond its buckets, run eager.
        self.compiled_decode = compiled_decode
        self.cache = cache
        self.device = model.device
        self.activate_adapters = activate_adapters

    @torch.inference_mode()
    def run(self, rows: list[ScheduledRow]) -> StepOutput:
        logits: dict[int, Tensor] = {}
        expert_tokens: Tensor | None = None
        # Prompt logprobs (echo): chunks that still hold prompt positions to score return every position, in
        # forwards of their own (a one-token chunk included), so the decode path stays as it is.
        scoring = [r for r in rows if scores_prompt(r)]
        if scoring:
            rows_left = [r for r in rows if not scores_prompt(r)]
        else:
            rows_left = rows
        decode = [r for r in rows_left if len(r.tokens) == 1]
        prefill = [r for r in rows_left if len(r.tokens) > 1]
        decode_groups = group_rows(decode, decode_work, MIN_SPLIT_DECODE)
        groups = decode_groups + group_rows(prefill, prefill_work, MIN_SPLIT_PREFILL)
        prompt_logits: dict[int, Tensor] = {}
        for group in group_rows(scoring, prefill_work, MIN_SPLIT_PREFILL):
            group.sort(key=lambda r: r.sequence.request.adapter or "")
            out_logits, counts = self._forward(group, all_positions=True)  # (B, T, V)
            for i, row in enumerate(group):
                prompt_logits[id(row.sequence)] = out_logits[i, : len(row.tokens)]  # (T, V)
                if row.needs_sample:
                    logits[id(row.sequence)] = out_logits[i, len(row.tokens) - 1]
            if counts is not None:
                expert_tokens = counts if expert_tokens is None else expert_tokens + counts
        for group in groups:
            group.sort(key=lambda r: r.sequence.request.adapter or "")
            out_logits, counts = self._forward(group)
            for i, row in enumerate(group):
                if row.needs_sample:
                    logits[id(row.sequence)] = out_logits[i]
            if counts is not None:
                expert_tokens = counts if expert_tokens is None else expert_tokens + counts
        return StepOutput(logits, sum(len(r.tokens) for r in rows), expert_tokens, prompt_logits)

    def _forward(self, rows: list[ScheduledRow], all_positions: bool = False) -> tuple[Tensor, Tensor | None]:
        return self.forward(
            [r.tokens for r in rows],
            [r.sequence.table.blocks for r in rows],
            [r.context_len for r in rows],
            [r.sequence.request.adapter for r in rows],
            all_positions=all_positions,
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: list[list[int]],
        block_tables: list[list[int]],
        context_lens: list[int],
        adapters: list[str | None] | None = None,
        all_positions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """One cached forward over rows of new tokens, each row's KV in the blocks its table lists.
        Returns logits (B, V) at each row's last new token, or (B, T, V) at every position with
        all_positions, and the (layers, E) expert counts (MoE)."""
        compiled = self.compiled_decode
        if compiled is not None and compiled.accepts(tokens, block_tables, adapters):
            return compiled.run_chunks(tokens, block_tables, context_lens, adapters, all_positions)
        longest = max(len(t) for t in tokens)
        batch = torch.tensor([row + [0] * (longest - len(row)) for row in tokens])  # (B, T) right-padded
        widest = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (widest - len(t)) for t in block_tables])  # (B, nb) padded with block 0
        query_lens = torch.tensor([len(t) for t in tokens])
        meta = AttentionMetadata.for_blocks(
            self.cache,
            block_tables=tables.to(self.device),
            context_lens=torch.tensor(context_lens, device=self.device),
            query_lens=query_lens.to(self.device),
        )
        active = nullcontext()
        if self.activate_adapters is not None and adapters is not None and any(adapters):
            active = self.activate_adapters(adapters, longest)
        last = None if all_positions else (query_lens - 1).to(self.device)
        with active:
            out = self.model(batch.to(self.device), meta=meta, logits_positions=last)
        return out.logits, out.expert_counts
