"""The engine: one background thread that steps every served model, fed by thread-safe submissions.

The HTTP layer calls `submit` (or the async `stream`) from the event loop; the loop thread admits,
batches and decodes, and sends `TokenEvent`s back through each request's callback. The loop runs off
the event loop so the API stays responsive.

Failure isolation: a failed step fails only its own requests (see worker.py) and the loop goes on;
only `max_consecutive_step_failures` failed steps in a row mark the engine dead. Then `alive` turns
False (readiness and liveness report it), every pending request ends with an error, and a submission
racing the death is refused at once (both happen under the same lock). `abandon` ends a request from
the caller's side when the loop cannot (dead or stuck), so no request can hang.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.sampler import RequestGenerator
from service.engine.scheduler import SchedulerConfig
from service.engine.sequence import Sequence
from service.engine.types import (
    FINISH_ABORT,
    FINISH_ERROR,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestTooLargeError,
    StepStats,
    TokenEvent,
    UnknownModelError,
)
from service.engine.worker import ModelWorker, ServedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    idle_wait_seconds: float = 0.05  # how long the loop sleeps when no model has work (woken by submissions)
    # Failed steps in a row after which the engine is declared dead (a fault that keeps recurring is not
    # one bad request: let the liveness probe restart the process).
    max_consecutive_step_failures: int = 3


class Engine:
    def __init__(self, config: EngineConfig | None = None, on_step: Callable[[StepStats], None] | None = None) -> None:
        self.config = config or EngineConfig()
        self.on_step = on_step
        self.workers: dict[str, ModelWorker] = {}
        self._lock = threading.Condition()
        self._inbox: list[tuple[str, Sequence]] = []
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.accepting = True
        self.error: BaseException | None = None
        self.consecutive_failures = 0

    # ---- set-up ----
    def add_model(self, served: ServedModel) -> None:
        self.workers[served.name] = ModelWorker(served, self.config.scheduler)

    def start(self) -> None:
        """Compile what is compiled (before the server reports ready), then start the engine loop."""
        for worker in self.workers.values():
            worker.warm_up()
        self._thread = threading.Thread(target=self._run, name="modelserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- requests ----
    def validate(self, request: GenerationRequest) -> ModelWorker:
        worker = self.workers.get(request.model)
        if worker is None:
            raise UnknownModelError(f"model {request.model!r} is not served")
        limit = worker.served.max_model_len
        if not request.prompt_ids:
            raise RequestTooLargeError("the prompt is empty")
        if len(request.prompt_ids) + request.params.max_tokens > limit:
            raise RequestTooLargeError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the model's context length max_model_len={limit}"
            )
        if request.adapter is not None:
            registry = worker.served.registry
            if registry is None or request.adapter not in registry.resident:
                raise UnknownModelError(f"adapter {request.adapter!r} is not loaded on model {request.model!r}")
        return worker

    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> Sequence:
        """Queue a request (thread-safe). Raises EngineError subclasses for requests that cannot run."""
        worker = self.validate(request)
        if not self.accepting or not self.alive:
            raise EngineUnavailableError("the engine is not accepting requests (draining, stopped or failed)")
        params = request.params
        seq = Sequence(
            request=request,
            on_event=on_event,
            detokenizer=IncrementalDetokenizer(worker.served.tokenizer, params.stop),
            generator=None if params.greedy else RequestGenerator(params.seed),
        )
        if request.adapter is not None and not worker.served.registry.acquire(request.adapter):
            raise UnknownModelError(f"adapter {request.adapter!r} was unloaded")
        seq.table.identity = worker.identity(request.adapter)
        with self._lock:
            if self.error is not None or self._stopping:  # the loop died or stopped while we prepared
                if request.adapter is not None:
                    worker.served.registry.release(request.adapter)
                raise EngineUnavailableError("the engine is not accepting requests (stopped or failed)")
            waiting = len(worker.scheduler.waiting) + sum(1 for name, _ in self._inbox if name == request.model)
            if waiting >= self.config.scheduler.max_waiting:
                if request.adapter is not None:
                    worker.served.registry.release(request.adapter)
                raise QueueFullError(
                    f"model {request.model!r} has {waiting} requests waiting (max_waiting="
                    f"{self.config.scheduler.max_waiting}); retry later"
                )
            self._inbox.append((request.model, seq))
            self._by_id[request.request_id] = seq
            self._lock.notify_all()
        return seq

    def cancel(self, request_id: str) -> None:
        """Ask the loop to abort a request at the next step boundary; ends it at once when the loop is gone."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None:
                return
            seq.cancelled = True
            self._lock.notify_all()
        if not self.alive:
            self.abandon(request_id)

    def abandon(self, request_id: str) -> None:
        """End a request from the caller's side with `abort` (the loop is dead or stuck); idempotent."""
        with self._lock:
            seq = self._by_id.pop(request_id, None)
        if seq is not None:
            seq.cancelled = True
            seq.emit([], "", finish_reason=FINISH_ABORT, error="the engine did not end the request in time")

    def open_stream(self, request: GenerationRequest) -> RequestStream:
        """Submit now (raising EngineError for requests that cannot run) and return the event stream.

        Call from a running event loop. Iterate it for TokenEvents; leaving early cancels the request."""
        return RequestStream(self, request, asyncio.get_running_loop())

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        async with self.open_stream(request) as events:
            async for event in events:
                yield event

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._by_id)

    # ---- the loop ----
    def _run(self) -> None:
        try:
            while self._step_all():
                pass
        except BaseException as exc:  # the loop must never die silently: readiness and liveness read self.error
            log.exception("engine loop died")
            self._die(exc)
            return
        self._end_all(FINISH_ABORT, "the server is shutting down")

    def _step_all(self) -> bool:
        """Move submissions into the schedulers and step every model with work; False when stopping."""
        with self._lock:
            while not self._stopping and not self._inbox and not any(w.has_work for w in self.workers.values()):
                self._lock.wait(self.config.idle_wait_seconds)
            if self._stopping:
                return False
            for name, seq in self._inbox:
                self.workers[name].scheduler.waiting.append(seq)
            self._inbox.clear()
        for worker in self.workers.values():
            if not worker.has_work:
                continue
            stats = worker.step()
            self._forget_finished(worker)
            self._count_failure(stats)
            if self.on_step is not None:
                try:
                    self.on_step(stats)
                except Exception:  # metrics must never stop serving
                    log.exception("the step-stats callback failed")
        return True

    def _count_failure(self, stats: StepStats) -> None:
        if stats.error is None:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.max_consecutive_step_failures:
            raise RuntimeError(
                f"{self.consecutive_failures} engine steps failed in a row (max_consecutive_step_failures="
                f"{self.config.max_consecutive_step_failures}); last: {stats.error}"
            )

    def _die(self, exc: BaseException) -> None:
        with self._lock:  # submissions check self.error under this lock: none can slip in after this
            self.error = exc
        self._end_all(FINISH_ERROR, f"engine failure: {exc!r}")

    def _end_all(self, reason: str, message: str) -> None:
        """End every request still known to the engine (queued, waiting or running)."""
        with self._lock:
            self._stopping = self._stopping or self.error is not None
            for name, seq in self._inbox:
                self.workers[name].scheduler.waiting.append(seq)
            self._inbox.clear()
        for worker in self.workers.values():
            try:
                worker.fail_all(reason, message)
            except Exception:
                log.exception("could not end the requests of model %s", worker.served.name)
            self._forget_finished(worker)
        with self._lock:
            leftover = list(self._by_id)
        for request_id in leftover:
            self.abandon(request_id)

    def _forget_finished(self, worker: ModelWorker) -> None:
        with self._lock:
            for request_id in worker.finished_ids:
                self._by_id.pop(request_id, None)
        worker.finished_ids.clear()


class RequestStream:
    """The caller's side of one submitted request: TokenEvents delivered into the event loop."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request = request
        self.finished = False
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        engine.submit(request, lambda event: loop.call_soon_threadsafe(self._queue.put_nowait, event))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self.finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        self.finished = event.finish_reason is not None
        return event

    def cancel(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self.finished:
            self.engine.cancel(self.request.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()
