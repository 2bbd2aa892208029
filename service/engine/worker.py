"""One served model inside the engine: its scheduler, KV cache, runner and the per-step bookkeeping.

A step: drop cancelled sequences, schedule, run the forwards, sample, detokenize, emit events,
finish sequences (stop, EOS, max_tokens, context full) and free their KV slots, and return the
step's stats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adapters.registry import AdapterRegistry
from models.decoder import CausalLM
from models.kv_cache import KVCache
from models.tokenizer import TextTokenizer
from service.engine.runner import ModelRunner
from service.engine.sampler import sample
from service.engine.scheduler import Scheduler, SchedulerConfig
from service.engine.sequence import Sequence
from service.engine.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, StepStats


@dataclass
class ServedModel:
    name: str
    model: CausalLM
    tokenizer: TextTokenizer
    max_model_len: int  # prompt + output tokens per sequence (KV cache length)
    eos_token_ids: tuple[int, ...] = ()
    # LoRA adapters of this base model (None: adapters disabled). Attached before the model serves.
    registry: AdapterRegistry | None = None


class ModelWorker:
    def __init__(self, served: ServedModel, config: SchedulerConfig) -> None:
        self.served = served
        self.scheduler = Scheduler(config)
        model = served.model
        self.cache = KVCache(model.config, config.max_batch_size, served.max_model_len, model.dtype, model.device)
        activate = served.registry.activate if served.registry is not None else None
        self.runner = ModelRunner(model, self.cache, activate)
        self.eos = set(served.eos_token_ids)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def kv_usage(self) -> float:
        held = sum(seq.num_computed for seq in self.scheduler.running)
        return held / (self.cache.num_slots * self.cache.max_seq_len)

    def step(self) -> StepStats:
        started = time.monotonic()
        self._drop_cancelled()
        rows = self.scheduler.schedule(self.cache.num_free)
        for row in rows:
            if row.sequence.slot is None:
                row.sequence.slot = self.cache.allocate()
            row.sequence.mark_scheduled()
        output = self.runner.run(rows) if rows else None
        sampling_rows = [r for r in rows if r.needs_sample]
        for row in rows:
            row.sequence.num_computed += len(row.tokens)
        if sampling_rows:
            seqs = [r.sequence for r in sampling_rows]
            logits = torch.stack([output.logits[id(s)] for s in seqs])  # (S, V)
            next_ids = sample(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
            for seq, token in zip(seqs, next_ids):
                self._append(seq, token)
        expert = output.expert_tokens.tolist() if output is not None and output.expert_tokens is not None else None
        return StepStats(
            model=self.served.name,
            num_sequences=len(rows),
            num_tokens=output.num_tokens if output else 0,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_usage(),
            step_seconds=time.monotonic() - started,
            adapters=[r.sequence.request.adapter for r in rows],
            expert_tokens=expert,
        )

    def _append(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        if token in self.eos and not params.ignore_eos:
            self.finish(seq, FINISH_STOP, token_ids=[token])
            return
        seq.output_ids.append(token)
        delta = seq.detokenizer.add(token)
        if seq.detokenizer.stopped:
            self.finish(seq, FINISH_STOP, token_ids=[token], text=delta)
        elif len(seq.output_ids) >= params.max_tokens or seq.total_len() >= self.served.max_model_len:
            self.finish(seq, FINISH_LENGTH, token_ids=[token], text=delta + seq.detokenizer.flush())
        else:
            seq.emit([token], delta)

    def finish(
        self, seq: Sequence, reason: str, token_ids: list[int] | None = None, text: str = "", error: str | None = None
    ) -> None:
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self.cache.free(seq.slot)
            seq.slot = None
        if seq.request.adapter is not None and self.served.registry is not None:
            self.served.registry.release(seq.request.adapter)
        if reason == FINISH_STOP and not seq.detokenizer.stopped:
            text += seq.detokenizer.flush()
        seq.emit(token_ids or [], text, finish_reason=reason, error=error)

    def _drop_cancelled(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.cancelled:
                self.finish(seq, FINISH_ABORT)

    def fail_all(self, reason: str, message: str) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.finish(seq, reason, error=message)
