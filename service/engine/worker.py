"""One served model inside the engine: its scheduler, KV cache, runner and the per-step bookkeeping.

A step: drop cancelled sequences, schedule, run the forwards, sample, detokenize, emit events,
finish sequences (stop, EOS or a stop_token_id, max_tokens, context full; max_tokens 0 with echo once
the prompt is scored) and free their KV slots, and return the
step's stats. Faults stay with the requests they touch: a row whose logits are not finite fails
alone, and an exception anywhere in a step fails that step's requests (their KV slots freed) and is
reported in the stats, so the engine decides whether to go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adapters.registry import AdapterRegistry
from models.decoder import CausalLM
from models.kv_cache import PagedKVCache, blocks_for
from models.sampling import nonfinite_rows
from models.tokenizer import TextTokenizer
from service.engine import logits_processing
from service.engine.block_manager import BlockManager
from service.engine.compiled_decode import CompiledDecode
from service.engine.ngram import NgramDecoder
from service.engine.runner import ModelRunner
from service.engine.sampler import sample
from service.engine.scheduler import ScheduledRow, Scheduler, SchedulerConfig
from service.engine.sequence import Sequence
from service.engine.speculative import SpeculativeConfig, SpeculativeDecoder
from service.engine.types import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, StepStats

log = logging.getLogger(__name__)
NONFINITE_MESSAGE = "the model produced non-finite values (NaN or inf) in its logits for this request"


@dataclass
class ServedModel:
    name: str
    model: CausalLM
    tokenizer: TextTokenizer
    max_model_len: int  # prompt + output tokens per sequence (KV cache length); capped at the model's positions
    eos_token_ids: tuple[int, ...] = ()
    # LoRA adapters of this base model (None: adapters disabled). Attached before the model serves.
    registry: AdapterRegistry | None = None
    # Speculative decoding: a smaller model with the same vocabulary that drafts for this one, or with
    # `speculative.method == "ngram"` drafts copied from the sequence's own history (no draft model).
    draft_model: CausalLM | None = None
    speculative: SpeculativeConfig | None = None


class ModelWorker:
    def __init__(self, served: ServedModel, config: SchedulerConfig) -> None:
        self.served = served
        model = served.model
        pool_tokens = config.kv_cache_tokens or config.max_batch_size * served.max_model_len
        num_blocks = blocks_for(pool_tokens, config.block_size)
        # A sequence must fit the pool on its own, or preempting the others could never make room for it.
        served.max_model_len = min(
            served.max_model_len, model.config.max_position_embeddings, num_blocks * config.block_size
        )
        self.cache = PagedKVCache(model.config, num_blocks, config.block_size, model.dtype, model.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        activate = served.registry.activate if served.registry is not None else None
        compiled = None
        if config.compile_decode and CompiledDecode.supports(model):
            compiled = CompiledDecode(
                model, self.cache, config.max_batch_size, served.registry, autotune=config.compile_autotune
            )
        elif config.compile_decode:
            log.warning("%s: compiled decode needs float weights (int8 models run eager)", served.name)
        self.runner = ModelRunner(model, self.cache, activate, compiled)
        self.eos = set(served.eos_token_ids)
        self.eos_ids = tuple(sorted(self.eos))  # masked for rows under min_tokens
        self.finished_ids: list[str] = []  # requests finished since the engine last collected them
        self.speculative: SpeculativeDecoder | None = None
        if served.speculative is not None and served.speculative.method == "ngram":
            self.speculative = NgramDecoder(None, served.speculative, vocab_size=model.config.vocab_size)
        elif served.draft_model is not None:
            if served.draft_model.config.vocab_size != model.config.vocab_size:
                raise ValueError(
                    f"draft vocab_size {served.draft_model.config.vocab_size} differs from the target's "
                    f"{model.config.vocab_size}: a draft must share the tokenizer"
                )
            spec_config = served.speculative or SpeculativeConfig()
            # The draft holds at most k more tokens per sequence than the target: its pool is the target's
            # plus k + 1 tokens for each running sequence.
            draft_blocks = num_blocks + config.max_batch_size * blocks_for(
                spec_config.num_draft_tokens + 1, config.block_size
            )
            self.speculative = SpeculativeDecoder.build(
                served.draft_model,
                draft_blocks,
                config.block_size,
                spec_config,
                compile_max_batch=config.max_batch_size if config.compile_decode else 0,
                autotune=config.compile_autotune,
            )
        self.scheduler = Scheduler(config, self.blocks, served.max_model_len, self._lookahead, self._on_preempt)
        self._prefix_queries = self._prefix_hits = self._preemptions = 0
        self.compile_seconds = 0.0  # compiled-decode warm-up of this process (0: none)

    def warm_up(self) -> None:
        """Compile the decode graphs, the draft's too (a no-op without compiled decode); logs progress and time."""
        graphs = [(self.served.name, self.runner.compiled_decode)]
        if self.speculative is not None and self.speculative.draft is not None:  # a draft model (not n-gram)
            graphs.append((f"{self.served.name} (draft)", self.speculative.draft.compiled_decode))
        for name, compiled in graphs:
            if compiled is not None and not compiled.warm:
                seconds = compiled.warm_up(lambda message, name=name: log.info("%s: %s", name, message))
                self.compile_seconds += seconds
                log.info("%s: compiled decode ready in %.1f s", name, seconds)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def kv_usage(self) -> float:
        return self.blocks.usage()

    def identity(self, adapter: str | None) -> str:
        """The prefix cache's key for KV computed under this adapter load ("" for the base model)."""
        if adapter is None or self.served.registry is None:
            return ""
        info = self.served.registry.resident.get(adapter)
        return f"{adapter}#{info.load_id if info is not None else 'gone'}"

    def _register(self, seq: Sequence) -> None:
        """Make seq's newly completed blocks reusable; the token list is built only when a block completed."""
        if self.blocks.has_unregistered(seq.table, seq.num_computed):
            self.blocks.register(seq.table, seq.all_tokens(), seq.num_computed)

    def _lookahead(self, seq: Sequence) -> int:
        return self.speculative.config.num_draft_tokens if self.speculative is not None else 0

    def _on_preempt(self, seq: Sequence) -> None:
        if self.speculative is not None:
            self.speculative.release(seq)

    def step(self) -> StepStats:
        """One step; an exception fails the requests of this step (KV freed) and is reported in `stats.error`."""
        started = time.monotonic()
        stats = StepStats(self.served.name, 0, 0, 0, 0, 0.0, 0.0)
        rows: list[ScheduledRow] = []
        try:
            self._drop_cancelled()
            rows = self.scheduler.schedule()
            self._run_rows(rows, stats)
            for row in rows:  # computed KV of full blocks becomes reusable (never after a failed step)
                seq = row.sequence
                if not seq.released:
                    self._register(seq)
        except Exception as exc:  # isolate the failure: this step's requests end, the engine goes on
            log.exception("engine step of model %s failed; failing its %d request(s)", self.served.name, len(rows))
            stats.error = f"{type(exc).__name__}: {exc}"
            for row in rows:
                try:
                    self.finish(row.sequence, FINISH_ERROR, error=f"engine step failed: {stats.error}")
                except Exception:  # finishing must not stop the others from finishing
                    log.exception("could not finish request %s after a failed step", row.sequence.request_id)
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.kv_usage()
        counters = self.blocks.stats
        stats.prefix_cache_queries = counters.queries - self._prefix_queries
        stats.prefix_cache_hits = counters.hits - self._prefix_hits
        stats.preemptions = counters.preemptions - self._preemptions
        self._prefix_queries, self._prefix_hits, self._preemptions = (
            counters.queries,
            counters.hits,
            counters.preemptions,
        )
        stats.step_seconds = time.monotonic() - started
        return stats

    def _run_rows(self, rows: list[ScheduledRow], stats: StepStats) -> None:
        for row in rows:
            row.sequence.mark_scheduled()
        speculates = [self._speculates(r) for r in rows]
        spec_rows = [r for r, spec in zip(rows, speculates) if spec]
        plain_rows = [r for r, spec in zip(rows, speculates) if not spec]
        stats.num_sequences = len(rows)
        stats.adapters = [r.sequence.request.adapter for r in rows]
        expert_tokens = None
        if plain_rows:
            output = self.runner.run(plain_rows)
            stats.num_tokens += output.num_tokens
            expert_tokens = output.expert_tokens
            for row in plain_rows:
                row.sequence.num_computed += len(row.tokens)
                if output.prompt_logits:  # prompt logprobs (echo): score the prompt tokens this chunk predicts
                    scored = output.prompt_logits.get(id(row.sequence))
                    if scored is not None:
                        logits_processing.observe_prompt(row.sequence, row.context_len, scored)
            seqs = [r.sequence for r in plain_rows if r.needs_sample]
            for seq in [s for s in seqs if s.request.params.max_tokens == 0]:  # echo scoring only: done
                self.finish(seq, FINISH_LENGTH)
                seqs.remove(seq)
            if seqs:
                logits = torch.stack([output.logits[id(s)] for s in seqs])  # (S, V)
                broken = nonfinite_rows(logits).tolist()  # (S,)
                seqs, logits = self._fail_nonfinite(seqs, logits, broken)
                chosen_from = logits_processing.process(seqs, logits, self.eos_ids)  # (S, V)
                next_ids = sample(chosen_from, [s.request.params for s in seqs], [s.generator for s in seqs])
                for i, (seq, token) in enumerate(zip(seqs, next_ids)):
                    logits_processing.observe(seq, token, logits[i])
                    self._append(seq, token)
        if spec_rows:
            counts = self._speculative_step(spec_rows, stats)
            if counts is not None:
                expert_tokens = counts if expert_tokens is None else expert_tokens + counts
        stats.expert_tokens = expert_tokens.tolist() if expert_tokens is not None else None

    def _fail_nonfinite(
        self, seqs: list[Sequence], logits: torch.Tensor, broken: list[bool]
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Fail the rows whose logits are not finite (that request alone); the others go on. logits (S, V)."""
        if not any(broken):
            return seqs, logits
        for seq, bad in zip(seqs, broken):
            if bad:
                self.finish(seq, FINISH_ERROR, error=NONFINITE_MESSAGE)
        keep = [i for i, bad in enumerate(broken) if not bad]
        return [seqs[i] for i in keep], logits[keep]

    def _speculates(self, row: ScheduledRow) -> bool:
        """Decode rows of a model with a draft, while k drafts still fit the sequence's context and blocks."""
        if self.speculative is None or not row.needs_sample or len(row.tokens) != 1:
            return False
        if logits_processing.needs_processing(row.sequence):
            return False
        needed = row.context_len + self.speculative.config.num_draft_tokens + 1
        return needed <= self.served.max_model_len and needed <= len(row.sequence.table.blocks) * self.cache.block_size

    def _speculative_step(self, rows: list[ScheduledRow], stats: StepStats) -> torch.Tensor | None:
        spec = self.speculative
        seqs = [r.sequence for r in rows]
        drafts, draft_probs = spec.propose(seqs)
        logits, counts = self.runner.forward(
            [r.tokens + d for r, d in zip(rows, drafts)],
            [s.table.blocks for s in seqs],
            [r.context_len for r in rows],
            [s.request.adapter for s in seqs],
            all_positions=True,
        )  # (B, k+1, V)
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            verified = logits[i, : len(drafts[i]) + 1]  # (k+1, V)
            if bool(nonfinite_rows(verified).any()):
                self.finish(seq, FINISH_ERROR, error=NONFINITE_MESSAGE)
                continue
            result = spec.accept(seq, drafts[i], verified, draft_probs[i])
            seq.num_computed = row.context_len + 1 + result.num_accepted
            self.blocks.shrink(seq.table, seq.num_computed + 1)  # rejected drafts give their blocks back
            stats.num_tokens += len(row.tokens) + len(drafts[i])
            stats.spec_draft_tokens += len(drafts[i])
            stats.spec_accepted_tokens += result.num_accepted
            for token in result.new_tokens:
                if seq.finished:
                    break
                self._append(seq, token)
        return counts

    def _append(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
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
        if seq.released:  # already ended (e.g. a step failing after the sequence stopped)
            return
        seq.released = True
        if reason in (FINISH_STOP, FINISH_LENGTH):  # its KV came from successful forwards: keep the full blocks
            self._register(seq)
        self.scheduler.remove(seq)
        self.finished_ids.append(seq.request_id)
        self.blocks.free(seq.table)
        if seq.request.adapter is not None and self.served.registry is not None:
            self.served.registry.release(seq.request.adapter)
        if self.speculative is not None:
            self.speculative.release(seq)
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
