"""Continuous-batching scheduler of one model: who runs in the next step, with how many tokens and blocks.

Each step has a token budget (`max_tokens_per_step`). Running sequences in decode take one token each
first (oldest first), so decoding never starves; sequences still prefilling take what is left of the
budget, long prompts in chunks; waiting sequences are admitted (FIFO) while batch rows, budget and KV
blocks allow. A new sequence first takes the cached blocks of its prefix (prefix caching) and
prefills only the rest; one that asked prompt logprobs takes none (it must compute every position).

KV blocks are taken as tokens arrive. When the pool runs out, the most recently admitted running
sequence is preempted: its blocks are freed (cached full blocks stay cached), its output so far is
kept, and it goes back to the front of the queue to be recomputed; so no request fails because the
pool is full, and the oldest requests always progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.engine.block_manager import BlockManager
from service.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences running at once (vLLM's max_num_seqs)
    max_tokens_per_step: int = 512  # tokens fed through the model in one step; bounds a step's latency
    max_waiting: int = 64  # queued sequences; beyond this, submissions are refused (429)
    compile_decode: bool = False  # torch.compile the decode step (worth it on a GPU; slow to warm up on CPU)
    compile_autotune: bool = False  # CPU: autotuned C++ matrix products in those graphs (compiled at every start)
    block_size: int = 16  # tokens per KV block
    # The KV pool of each model, in tokens (rounded up to whole blocks). None: max_batch_size x max_model_len,
    # the memory a slot per sequence would take; with paging it holds many more short sequences.
    kv_cache_tokens: int | None = None
    enable_prefix_caching: bool = True


@dataclass
class ScheduledRow:
    sequence: Sequence
    tokens: list[int]  # fed this step
    context_len: int  # tokens already cached
    needs_sample: bool  # True when this row's last token yields the next output token


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        max_model_len: int,
        lookahead: Callable[[Sequence], int] = lambda seq: 0,
        on_preempt: Callable[[Sequence], None] = lambda seq: None,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.lookahead = lookahead  # extra KV positions a decode row needs (speculative drafts)
        self.on_preempt = on_preempt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledRow]:
        budget = self.config.max_tokens_per_step
        rows: list[ScheduledRow] = []
        preemptions = self.blocks.stats.preemptions
        for seq in list(self.running):  # decode rows, oldest first
            if seq not in self.running or seq.in_prefill:
                continue
            need = min(seq.num_computed + 1 + self.lookahead(seq), self.max_model_len)
            if self._make_room(seq, need):
                rows.append(ScheduledRow(seq, seq.pending_tokens()[-1:], seq.num_computed, True))
                budget -= 1
        for seq in list(self.running):  # running prefills (and recomputations) with what is left
            if budget <= 0:
                break
            if seq not in self.running or not seq.in_prefill:
                continue
            row = self._prefill_row(seq, budget)
            if row is None and self._make_room(seq, seq.num_computed + 1):
                row = self._prefill_row(seq, budget)
            if row is not None:
                rows.append(row)
                budget -= len(row.tokens)
        if self.blocks.stats.preemptions != preemptions:  # rows of sequences preempted after being scheduled go
            return [row for row in rows if row.sequence in self.running]  # and nobody is admitted: no room
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            if not seq.table.blocks:
                # A sequence that scores its prompt (prompt logprobs) computes every position: no cached prefix.
                scores_prompt = seq.request.params.prompt_logprobs is not None
                hit = 0 if scores_prompt else self.blocks.match_prefix(seq.table, seq.all_tokens())
                seq.num_computed = hit
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = min(hit, seq.prompt_len)
            row = self._prefill_row(seq, budget)
            if row is None:  # the pool is full: wait for blocks (cached ones stay cached)
                self.blocks.free(seq.table)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            rows.append(row)
            budget -= len(row.tokens)
        return rows

    def _prefill_row(self, seq: Sequence, budget: int) -> ScheduledRow | None:
        """The next chunk of seq's pending tokens that fits the budget and the free blocks; None if none fits."""
        pending = seq.pending_tokens()
        room = (len(seq.table.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
        chunk = pending[: min(budget, room)]
        if not chunk or not self.blocks.grow(seq.table, seq.num_computed + len(chunk)):
            return None
        return ScheduledRow(seq, chunk, seq.num_computed, needs_sample=len(chunk) == len(pending))

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for num_tokens of seq, preempting the newest running sequences; False if seq itself went."""
        while not self.blocks.grow(seq.table, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.blocks.stats.preemptions += 1
        self.on_preempt(seq)
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
