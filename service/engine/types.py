"""The small dataclasses that pass between the HTTP layer, the engine, the scheduler and the runner."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.sampling import is_greedy

if TYPE_CHECKING:
    from service.engine.guided import GuidedSpec

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
    min_p: float = 0.0  # drop tokens below min_p x the best token's probability (0: off)
    presence_penalty: float = 0.0  # OpenAI: minus this for each token already generated (output only)
    frequency_penalty: float = 0.0  # OpenAI: minus this x the times a token was generated (output only)
    repetition_penalty: float = 1.0  # vLLM/HF: tokens of prompt or output, logit / p if > 0 else logit x p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logit
    stop_token_ids: tuple[int, ...] = ()  # generating one of these ends with finish_reason "stop"
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    logprobs: int | None = None  # top logprobs returned per generated token (0: the chosen one only)
    prompt_logprobs: int | None = None  # same for each prompt token (echo); every prompt position computed
    guided: GuidedSpec | None = None  # structured output: the grammar the output must follow (guided.py)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature, self.top_k)

    @property
    def penalised(self) -> bool:
        """True when the row needs `service.engine.penalties` before sampling."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw logits (log-softmax before temperature,
    penalties and truncation, as vLLM returns by default) and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


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
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when the request asked logprobs
    # Once, on the first event after the prompt is scored: one per prompt token, None for the first one.
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
