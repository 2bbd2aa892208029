"""Continuous-batching scheduler of one model: who runs in the next step, and with how many tokens.

Each step has a token budget (`max_tokens_per_step`). Running sequences in decode take one token each
first, so decoding never starves; sequences still prefilling take what is left of the budget, long
prompts in chunks; waiting sequences are admitted (FIFO) while KV slots and batch rows are free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences running at once (= KV cache slots)
    max_tokens_per_step: int = 512  # tokens fed through the model in one step; bounds a step's latency
    max_waiting: int = 64  # queued sequences; beyond this, submissions are refused (429)
    compile_decode: bool = False  # torch.compile the decode step (worth it on a GPU; slow to warm up on CPU)


@dataclass
class ScheduledRow:
    sequence: Sequence
    tokens: list[int]  # fed this step
    context_len: int  # tokens already cached
    needs_sample: bool  # True when this row's last token yields the next output token


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, free_slots: int) -> list[ScheduledRow]:
        budget = self.config.max_tokens_per_step
        rows: list[ScheduledRow] = []
        for seq in self.running:
            if not seq.in_prefill:
                rows.append(ScheduledRow(seq, seq.pending_tokens()[-1:], seq.num_computed, True))
                budget -= 1
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                rows.append(self._prefill_row(seq, budget))
                budget -= len(rows[-1].tokens)
        admitted: list[Sequence] = []
        while self.waiting and budget > 0 and free_slots > len(admitted):
            if len(self.running) + len(admitted) >= self.config.max_batch_size:
                break
            seq = self.waiting.popleft()
            admitted.append(seq)
            rows.append(self._prefill_row(seq, budget))
            budget -= len(rows[-1].tokens)
        self.running.extend(admitted)
        return rows

    @staticmethod
    def _prefill_row(seq: Sequence, budget: int) -> ScheduledRow:
        pending = seq.pending_tokens()
        chunk = pending[:budget]
        return ScheduledRow(seq, chunk, seq.num_computed, needs_sample=len(chunk) == len(pending))

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
