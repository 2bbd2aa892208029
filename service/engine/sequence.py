"""Engine-side state of one request while it waits, runs and finishes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.block_manager import BlockTable
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.sampler import RequestGenerator
from service.engine.types import GenerationRequest, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity: the scheduler's membership tests must not compare every field
class Sequence:
    request: GenerationRequest
    on_event: Callable[[TokenEvent], None]
    detokenizer: IncrementalDetokenizer
    generator: RequestGenerator | None
    output_ids: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)  # its KV blocks (paged cache)
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    cancelled: bool = False  # set by any thread; acted on at the next step boundary
    finished: bool = False  # the final event was emitted (by the engine, or by `Engine.abandon`)
    released: bool = False  # the worker freed its KV slot, adapter and draft state (engine thread only)
    # Logits processing (service/engine/logits_processing.py): per-row state of penalties, the chosen
    # tokens' logprobs not yet emitted, and the scored prompt tokens (echo) until they are emitted.
    penalty_state: object | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    _emit_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        """More than one token to feed: the prompt, or a preempted sequence's whole history."""
        return self.total_len() - self.num_computed > 1

    def all_tokens(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    def pending_tokens(self) -> list[int]:
        """Tokens to feed next: the rest of the prompt (or of the history after a preemption), or the
        last sampled token."""
        if self.num_computed < self.prompt_len:
            return self.request.prompt_ids[self.num_computed :] + self.output_ids
        return self.output_ids[self.num_computed - self.prompt_len :]

    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def mark_scheduled(self) -> None:
        if self.first_scheduled is None:
            self.first_scheduled = time.monotonic()

    def emit(self, token_ids: list[int], text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        """Deliver one event; nothing after the final one (the engine and `abandon` may race to end it)."""
        with self._emit_lock:
            if self.finished:
                return
            now = time.monotonic()
            if token_ids and self.first_token is None:
                self.first_token = now
            event = TokenEvent(
                request_id=self.request_id,
                token_ids=token_ids,
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=self.prompt_len,
                completion_tokens=len(self.output_ids),
                cached_tokens=self.num_cached_tokens or 0,
                error=error,
                token_times=[now] * len(token_ids),
            )
            if self.request.params.logprobs is not None:
                event.logprobs, self.pending_logprobs = self.pending_logprobs, []
            if self.request.params.prompt_logprobs is not None and not self.prompt_logprobs_sent:
                scored = self.prompt_logprobs or [None]  # a one-token prompt has nothing to score
                if len(scored) >= self.prompt_len or finish_reason is not None:
                    event.prompt_logprobs, self.prompt_logprobs_sent = scored, True
            if finish_reason is not None:
                self.finished = True
                arrival = self.request.arrival_time
                event.queue_time = (self.first_scheduled or now) - arrival
                event.time_to_first_token = None if self.first_token is None else self.first_token - arrival
            try:
                self.on_event(event)
            except Exception:  # the receiver is gone (closed event loop, dropped client): stop generating for it
                log.debug("event receiver of %s failed; cancelling", self.request_id, exc_info=True)
                self.cancelled = True
