"""The engine client: the one way into the engine for the HTTP routes, the Ray replica and the benchmarks.

In the shape of vLLM v1's front end (AsyncLLM with its input and output processors), so the engine
core could later run in its own process behind it:

- input: resolve a requested name to a base model and adapter (`Target`), the single admission bound
  per model (checked before any tokenization), prompt checks and tokenization, sampling parameters;
- the one adapter catalog (`AdapterCatalog`: load, unload, ensure resident, list);
- output: one `RequestHandle` per request that delivers the engine's `TokenEvent`s on the caller's
  event loop, feeds the request's metrics in one place, ends it at `request_timeout_s`, and tells
  how a request that did not end normally failed.

Callers see only this module's small dataclasses (`Target`, `ModelInfo`, `AdapterCard`) and the
engine's (`SamplingParams`, `TokenEvent`, `EngineError`s); nothing from `models/` or `adapters/`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from service.engine import guided
from service.engine.catalog import AdapterCard, AdapterCatalog
from service.engine.engine import Engine
from service.engine.types import (
    FINISH_ABORT,
    FINISH_ERROR,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    UnknownModelError,
)
from service.engine.worker import ServedModel

TOKENIZE_INLINE_CHARS = 20_000  # longer prompts are tokenized in a worker thread, off the event loop
# After a timeout's cancel, how long the engine loop may take to answer before the request is ended
# here: longer than any one engine step (a long prefill chunk on a CPU), short next to request_timeout_s.
ABANDON_GRACE_S = 10.0


class RequestTimeoutError(EngineError):
    status = 504
    kind = "timeout_error"


class EngineFailedError(EngineError):
    """The engine failed this request (non-finite logits, a failed step): the server's fault (HTTP 500)."""

    status = 500
    kind = "server_error"


class Tracker(Protocol):
    def on_event(self, event: TokenEvent) -> None: ...
    def finish(self, outcome: str, event: TokenEvent | None = None) -> None: ...


class RequestObserver(Protocol):
    """Where request outcomes and timings go (the metrics exporter)."""

    def track(self, model: str, adapter: str | None, prompt_tokens: int, arrival: float) -> Tracker: ...
    def rejected(self, model: str, adapter: str | None) -> None: ...


@dataclass(frozen=True)
class ClientConfig:
    capacity: int = 96  # requests per model admitted at once: the running batch plus the waiting queue
    max_prompt_chars: int = 1_000_000
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class Target:
    name: str  # as requested: a base model or an adapter name
    base: str
    adapter: str | None


@dataclass(frozen=True)
class ModelInfo:
    """What the outside sees of one served base model (plain data)."""

    name: str
    directory: Path
    max_model_len: int
    vocab_size: int
    parameters: int
    size_bytes: int
    dtype: str | None
    quantization: str | None
    device: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


@dataclass
class _Model:
    served: ServedModel
    info: ModelInfo
    in_flight: int = 0


class EngineClient:
    def __init__(
        self,
        engine: Engine,
        models: dict[str, tuple[ServedModel, ModelInfo]],
        catalog: AdapterCatalog,
        config: ClientConfig,
        observer: RequestObserver,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.config = config
        self.observer = observer
        self._models = {name: _Model(served, info) for name, (served, info) in models.items()}
        self._lock = threading.Lock()

    # ---- catalog ----
    def models(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    def model(self, name: str) -> ModelInfo:
        return self._models[name].info

    def adapters(self) -> list[AdapterCard]:
        return self.catalog.cards()

    def knows(self, name: str) -> bool:
        return name in self._models or self.catalog.base_of(name) is not None

    def resolve(self, name: str) -> Target:
        """The base model and adapter a requested name means (404 when neither)."""
        if name in self._models:
            return Target(name, name, None)
        base = self.catalog.base_of(name)
        if base is not None:
            return Target(name, base, name)
        known = ", ".join([*self._models, *self.catalog.known])
        raise UnknownModelError(
            f"model {name!r} does not exist; served: {known}", param="model", code="model_not_found"
        )

    async def load_adapter(self, name: str, path: str, base: str | None = None, pinned: bool = False) -> AdapterCard:
        return await self.catalog.load(name, path, base, pinned, set(self._models))

    def unload_adapter(self, name: str) -> AdapterCard:
        return self.catalog.unload(name)

    # ---- admission ----
    def admit(self, target: Target) -> None:
        """Reserve one of the base model's request places; a 429 when they are all taken."""
        with self._lock:
            model = self._models[target.base]
            if model.in_flight >= self.config.capacity:
                self.observer.rejected(target.base, target.adapter)
                raise QueueFullError(
                    f"model {target.base!r} has {self.config.capacity} requests in flight (max_batch_size + "
                    "max_waiting); retry later"
                )
            model.in_flight += 1

    def release(self, target: Target) -> None:
        with self._lock:
            model = self._models[target.base]
            model.in_flight = max(0, model.in_flight - 1)

    def in_flight(self) -> int:
        with self._lock:
            return sum(m.in_flight for m in self._models.values())

    def reject(self, target: Target) -> None:
        """Count a request refused before admission (draining, engine dead)."""
        self.observer.rejected(target.base, target.adapter)

    # ---- input processing ----
    def check_text(self, text: str, param: str, limit: int | None = None) -> None:
        limit = limit or self.config.max_prompt_chars
        if len(text) > limit:
            raise InvalidRequestError(f"{param} has {len(text)} characters, over max_prompt_chars={limit}", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            message = f"{param} is not valid UTF-8 (unpaired surrogate at {exc.start})"
            raise InvalidRequestError(message, param=param) from exc

    def check_token_ids(self, target: Target, ids: list[int]) -> None:
        info = self.model(target.base)
        if len(ids) >= info.max_model_len:  # the length first: the range scan below stays bounded
            self._too_long(len(ids), info.max_model_len)
        if ids and (min(ids) < 0 or max(ids) >= info.vocab_size):
            raise InvalidRequestError(f"prompt token ids must be in [0, {info.vocab_size})", param="prompt")

    async def tokenize(self, target: Target, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._models[target.base].served.tokenizer
        add_bos = add_special_tokens and tokenizer.add_bos
        add_bos = add_bos and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        if len(text) > TOKENIZE_INLINE_CHARS:
            return await asyncio.to_thread(tokenizer.encode, text, add_bos)
        return tokenizer.encode(text, add_bos)

    def detokenize(self, target: Target, ids: list[int]) -> str:
        info = self.model(target.base)
        if len(ids) > info.max_model_len:
            raise InvalidRequestError(f"{len(ids)} tokens, over max_model_len={info.max_model_len}", param="tokens")
        if ids and (min(ids) < 0 or max(ids) >= info.vocab_size):
            raise InvalidRequestError(f"token ids must be in [0, {info.vocab_size})", param="tokens")
        return self._models[target.base].served.tokenizer.decode(ids)

    def sampling_params(self, prompt_len: int, target: Target, max_tokens: int | None, default: int, **fields):
        """Validated SamplingParams; max_tokens defaults to `default`, capped by what the context leaves."""
        max_len = self.model(target.base).max_model_len
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if prompt_len >= max_len:
            self._too_long(prompt_len, max_len)
        if max_tokens is None:
            max_tokens = min(default, max_len - prompt_len)
        stops = list(fields.pop("stop", ()) or ())
        if len(stops) > self.config.max_stop_sequences:
            raise InvalidRequestError(
                f"{len(stops)} stop strings, over max_stop_sequences={self.config.max_stop_sequences}", param="stop"
            )
        for stop in stops:
            if not stop or len(stop) > self.config.max_stop_chars:
                raise InvalidRequestError(
                    f"each stop string needs 1 to {self.config.max_stop_chars} characters", param="stop"
                )
            self.check_text(stop, "stop", self.config.max_stop_chars)
        fields["top_k"] = max(fields.get("top_k", 0), 0)
        vocab = self.model(target.base).vocab_size
        bias = fields.pop("logit_bias", None) or {}
        if any(not 0 <= token < vocab for token in bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        stop_ids = tuple(fields.pop("stop_token_ids", None) or ())
        if any(not 0 <= token < vocab for token in stop_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if fields.get("min_tokens", 0) > max_tokens:
            raise InvalidRequestError(
                f"min_tokens={fields['min_tokens']} is over max_tokens={max_tokens}", param="min_tokens"
            )
        if fields.get("guided") is not None:  # structured output: compiled here, so a bad schema is a 400
            served = self._models[target.base].served
            fields["guided"] = guided.prepare(fields["guided"], served.tokenizer, vocab, served.eos_token_ids)
        return SamplingParams(
            max_tokens=max_tokens,
            stop=tuple(stops),
            logit_bias=tuple(sorted(bias.items())),
            stop_token_ids=stop_ids,
            **fields,
        )

    def token_texts(self, target: Target, ids: list[int]) -> list[str]:
        """The text of each token on its own (logprobs' `tokens`); special tokens are kept."""
        decode = self._models[target.base].served.tokenizer.decode
        return [decode([token], skip_special_tokens=False) for token in ids]

    @staticmethod
    def _too_long(tokens: int, max_len: int) -> None:
        raise InvalidRequestError(
            f"the prompt has {tokens} tokens; the model's context is max_model_len={max_len}",
            param="prompt",
            code="context_length_exceeded",
        )

    # ---- requests ----
    async def generate(
        self, target: Target, prompt_ids: list[int], params: SamplingParams, streaming: bool
    ) -> RequestHandle:
        """Submit an admitted request (its adapter made resident first); always `close()` the handle.
        `await handle.started` returns once its first event came (the prompt is computed)."""
        if target.adapter is not None:
            await self.catalog.ensure_resident(target.adapter)
        try:
            return RequestHandle(self, target, prompt_ids, params, streaming)
        except QueueFullError:
            self.observer.rejected(target.base, target.adapter)
            raise


@dataclass
class RequestHandle:
    """One submitted request. Streaming: iterate `events()` (one event-loop wake-up per engine event).
    Otherwise: `await result()`; events are gathered on the engine thread and the loop is woken once at
    the end (fewer thread hand-offs). `close()` runs once whatever happens: it cancels the request if it
    is still running, records `abort`, and frees the admission place."""

    client: EngineClient
    target: Target
    prompt_ids: list[int]
    params: SamplingParams
    streaming: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timed_out: bool = False
    closed: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        client, loop = self.client, asyncio.get_running_loop()
        self.request = GenerationRequest(self.id, self.target.base, self.prompt_ids, self.params, self.target.adapter)
        self.tracker = client.observer.track(
            self.target.base, self.target.adapter, len(self.prompt_ids), time.monotonic()
        )
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # non-streaming: every event's logprobs, in order
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done: asyncio.Future[TokenEvent] = loop.create_future()
        self.started: asyncio.Future[None] = loop.create_future()  # the first event came (the prompt is computed)
        first = [True]

        def on_event(event: TokenEvent) -> None:  # engine thread (or the caller's, for `abandon`)
            self.tracker.on_event(event)  # the one place a request's metrics are fed, streaming or not
            if event.prompt_logprobs is not None:  # before `started` resolves: choices sharing this prompt read it
                self.prompt_logprobs = event.prompt_logprobs
            if first[0]:
                first[0] = False
                loop.call_soon_threadsafe(self._start)
            if self.streaming:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
                return
            self.parts.append(event.text)
            if event.logprobs:
                self.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                self.finished = True
                loop.call_soon_threadsafe(self._finish, event)

        client.engine.submit(self.request, on_event)  # raises EngineError: nothing submitted
        self._timer = loop.call_later(client.config.request_timeout_s, self._timeout)

    def _start(self) -> None:
        if not self.started.done():
            self.started.set_result(None)

    def _finish(self, event: TokenEvent) -> None:
        if not self._done.done():
            self._done.set_result(event)

    def _timeout(self) -> None:
        self.timed_out = True
        engine = self.client.engine
        engine.cancel(self.id)  # the engine answers with an `abort` event (at once if its loop is gone)
        # A loop that is alive but stuck (a forward that never returns) cannot answer: end it from here.
        asyncio.get_running_loop().call_later(ABANDON_GRACE_S, engine.abandon, self.id)

    async def events(self) -> AsyncIterator[TokenEvent]:
        while not self.finished:
            event = await self._queue.get()
            self.finished = event.finish_reason is not None
            yield event

    async def result(self) -> tuple[str, TokenEvent]:
        """(text, final event) of a non-streaming request."""
        event = await self._done
        return "".join(self.parts), event

    def failure(self, event: TokenEvent) -> EngineError | None:
        """How a final event that is not a normal end (abort, error) failed, as an error to report."""
        if event.finish_reason == FINISH_ABORT:
            if self.timed_out:
                timeout = self.client.config.request_timeout_s
                return RequestTimeoutError(f"request timed out after request_timeout_s={timeout}")
            return EngineUnavailableError("request aborted: the server is shutting down")
        if event.finish_reason == FINISH_ERROR:
            return EngineFailedError(f"generation failed: {event.error}")
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        if not self.finished:
            self.client.engine.cancel(self.id)
            self.tracker.finish("abort")
        self.client.release(self.target)
