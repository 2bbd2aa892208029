"""The small dataclasses that pass between the HTTP layer, the engine, the scheduler and the runner."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from models.sampling import is_greedy

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


class EngineError(Exception):
    """Base of the errors a request can meet before it runs; `status`/`kind` are its HTTP meaning,
    `param` the request field at fault (if any), `code` a machine-readable reason."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequestError(EngineError):
    """A request (or adapter) the engine cannot take as it is (HTTP 400)."""


class RequestTooLargeError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the model's context or the engine's limits."""


class UnknownModelError(EngineError):
    status = 404
    kind = "not_found_error"


class ConflictError(EngineError):
    """An adapter name taken or being loaded, an adapter in use, or no room for one (HTTP 409)."""

    status = 409
    kind = "conflict_error"


class QueueFullError(EngineError):
    """The model's waiting queue is full: refused at once so clients back off (HTTP 429)."""

    status = 429
    kind = "rate_limit_error"


class EngineUnavailableError(EngineError):
    """The engine is draining, stopped, or its loop died (HTTP 503)."""

    status = 503
    kind = "service_unavailable"


class StoreUnavailableError(EngineUnavailableError):
    """An adapter's files went bad after it was loaded: the server's store is at fault (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below models.sampling.GREEDY_TEMPERATURE (1e-5, 0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # a seeded request samples the same tokens whatever it is batched with
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature, self.top_k)


@dataclass
class GenerationRequest:
    request_id: str
    model: str  # base model name
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # LoRA adapter name bound to `model`, or None for the base
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenEvent:
    """One increment of a request's output; the last one carries finish_reason and the timings."""

    request_id: str
    token_ids: list[int]
    text: str  # new text since the previous event
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.prompt_tokens_details)
    error: str | None = None
    # Timings, seconds (monotonic clock): set on the final event.
    queue_time: float | None = None  # arrival -> first scheduled
    time_to_first_token: float | None = None  # arrival -> first token produced
    token_times: list[float] = field(default_factory=list)  # when each new token was produced (this event)


@dataclass
class StepStats:
    """What one engine step did, for the metrics exporter (plain data; exported in one place)."""

    model: str
    num_sequences: int  # rows in the batch
    num_tokens: int  # tokens fed through the model this step (prefill chunks + decode tokens)
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # KV blocks held by sequences / blocks in the pool, 0..1 (evictable cached blocks are free)
    step_seconds: float
    adapters: list[str | None] = field(default_factory=list)  # adapter of each row
    expert_tokens: list[list[int]] | None = None  # (layers, experts) tokens routed this step; MoE only
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0  # of those, tokens found cached
    preemptions: int = 0  # sequences preempted this step (KV freed, recomputed later)
    error: str | None = None  # the exception that failed this step (its requests ended with an error)
