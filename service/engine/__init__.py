"""The inference engine: requests, continuous-batching scheduler, model runner, sampler."""

from service.engine.engine import Engine, EngineConfig, RequestStream
from service.engine.scheduler import SchedulerConfig
from service.engine.types import (
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestTooLargeError,
    SamplingParams,
    StepStats,
    TokenEvent,
    TokenLogprob,
    UnknownModelError,
)
from service.engine.worker import ServedModel

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineUnavailableError",
    "GenerationRequest",
    "QueueFullError",
    "RequestStream",
    "RequestTooLargeError",
    "SamplingParams",
    "SchedulerConfig",
    "ServedModel",
    "StepStats",
    "TokenEvent",
    "TokenLogprob",
    "UnknownModelError",
]
