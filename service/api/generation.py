"""One generation request from admission to its end: the part shared by completions and chat.

Order of work (cheapest refusal first): readiness/drain (503) -> model lookup (404) -> admission, which
reserves a place in the model's bounded queue (429 with Retry-After, before any tokenization or model
work) -> prompt checks and tokenization (400) -> engine submission -> events. `Generation.close()`
runs exactly once whatever happens (finished, client gone, timeout, error): it cancels the engine
request if still running, records `abort`, and frees the admission slot.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from adapters.peft_format import AdapterError
from adapters.registry import AdapterCapacityError, AdapterRegistry, resolve_under_roots
from service.api.deps import ServiceState
from service.api.errors import APIError, from_engine_error
from service.api.schemas import SamplingFields
from service.engine import EngineError, GenerationRequest, QueueFullError, SamplingParams, TokenEvent
from service.loading import LoadedModel, discover

log = logging.getLogger(__name__)
TOKENIZE_INLINE_CHARS = 20_000  # longer prompts are tokenized in a worker thread, off the event loop
# After a timeout's cancel, how long the engine loop may take to answer before the request is ended
# here: longer than any one engine step (a long prefill chunk on a CPU), short next to request_timeout_s.
ABANDON_GRACE_S = 10.0


@dataclass
class Target:
    base: str
    adapter: str | None
    loaded: LoadedModel


def unavailable(state: ServiceState) -> APIError | None:
    reason = state.not_ready_reason()
    if reason is None:
        return None
    return APIError(503, f"service unavailable: {reason}", headers={"Retry-After": str(state.settings.retry_after_s)})


def lookup(state: ServiceState, name: str) -> Target:
    if name in state.models:
        return Target(name, None, state.models[name])
    if name in state.adapters:
        base = state.adapters[name][0]
        return Target(base, name, state.models[base])
    known = ", ".join([*state.models, *state.adapters])
    raise APIError(404, f"model {name!r} does not exist; served: {known}", param="model", code="model_not_found")


def _reload(state: ServiceState, registry: AdapterRegistry, name: str, directory: Path) -> None:
    startup = discover(state.settings)[1].get(name)
    if startup is None or Path(startup) != directory:  # admin-loaded: the roots apply again
        directory = resolve_under_roots(str(directory), state.settings.effective_adapter_roots)
    registry.ensure(name, directory)


async def ensure_resident(state: ServiceState, target: Target) -> None:
    """Make the request's adapter resident, reloading it (in a worker thread) if LRU evicted it.

    The adapter is held (one in-use count) from here to the event loop's next turn, so across the
    synchronous engine submission that follows (which takes the request's own count): no concurrent
    load can evict it in between. A reload re-checks the adapter roots (the directory may have been
    swapped for a link out of them since the admin load); start-up adapters are exempt (they need not
    be under the roots). Reload failures: no room -> 409 `conflict_error`; files that became bad or a
    path now outside the roots -> 503 with Retry-After naming the file and reason (the server's
    adapter store is at fault, not the request: an admin fixes or unloads the adapter).
    """
    name = target.adapter
    if name is None:
        return
    registry = target.loaded.served.registry
    for _ in range(3):  # an adapter evicted again before this coroutine resumed is reloaded again
        if registry.acquire(name):
            asyncio.get_running_loop().call_soon(registry.release, name)
            return
        entry = state.adapters.get(name)
        if entry is None:
            raise APIError(404, f"adapter {name!r} was unloaded", param="model", code="model_not_found")
        try:
            await run_in_threadpool(_reload, state, registry, name, entry[1])
        except AdapterCapacityError as exc:
            raise APIError(409, f"adapter {name!r} could not be reloaded: {exc}", "conflict_error") from exc
        except (AdapterError, OSError, ValueError) as exc:  # bad files, path outside the roots, LoadingError
            headers = {"Retry-After": str(state.settings.retry_after_s)}
            raise APIError(503, f"adapter {name!r} could not be reloaded: {exc}", headers=headers) from exc
        if state.adapters.get(name) != entry:  # unloaded (or replaced) by an admin meanwhile
            raise APIError(404, f"adapter {name!r} was unloaded", param="model", code="model_not_found")
    raise APIError(
        409, f"adapter {name!r} was evicted again before use: more adapters in use than max_adapters", "conflict_error"
    )


def check_text(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise APIError(400, f"{param} has {len(text)} characters, over max_prompt_chars={limit}", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid UTF-8 (unpaired surrogate at {exc.start})", param=param) from exc


async def tokenize(target: Target, text: str) -> list[int]:
    tokenizer = target.loaded.served.tokenizer
    add_bos = tokenizer.add_bos and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    if len(text) > TOKENIZE_INLINE_CHARS:
        return await run_in_threadpool(tokenizer.encode, text, add_bos)
    return tokenizer.encode(text, add_bos)


def sampling_params(body: SamplingFields, state: ServiceState, max_tokens: int) -> SamplingParams:
    stops = body.stop_list()
    settings = state.settings
    if len(stops) > settings.max_stop_sequences:
        raise APIError(
            400, f"{len(stops)} stop strings, over max_stop_sequences={settings.max_stop_sequences}", param="stop"
        )
    for stop in stops:
        if not stop or len(stop) > settings.max_stop_chars:
            raise APIError(400, f"each stop string needs 1 to {settings.max_stop_chars} characters", param="stop")
        check_text(stop, settings.max_stop_chars, "stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=tuple(stops),
        ignore_eos=body.ignore_eos,
    )


class Generation:
    """An admitted request submitted to the engine; always `close()` it.

    Streaming (`streaming=True`): iterate `events()`, one event-loop wake-up per engine event.
    Otherwise: `await result()`; events are gathered on the engine thread and the event loop is woken
    once, at the end (fewer thread hand-offs: lower latency under the GIL).
    """

    def __init__(
        self, state: ServiceState, target: Target, prompt_ids: list[int], params: SamplingParams, streaming: bool
    ) -> None:
        self.state = state
        self.target = target
        self.id = uuid.uuid4().hex
        self.request = GenerationRequest(self.id, target.base, prompt_ids, params, target.adapter)
        self.tracker = state.metrics.track(target.base, target.adapter, len(prompt_ids), self.request.arrival_time)
        self.timed_out = False
        self.closed = False
        self.finished = False
        loop = asyncio.get_running_loop()
        self.stream = None
        if streaming:
            self.stream = state.engine.open_stream(self.request)  # raises EngineError: nothing submitted
        else:
            self.parts: list[str] = []
            self._done: asyncio.Future[TokenEvent] = loop.create_future()

            def on_event(event: TokenEvent) -> None:  # engine thread
                self.parts.append(event.text)
                self.tracker.on_event(event)
                if event.finish_reason is not None:
                    self.finished = True
                    loop.call_soon_threadsafe(self._finish, event)

            state.engine.submit(self.request, on_event)  # raises EngineError: nothing submitted
        self._timer = loop.call_later(state.settings.request_timeout_s, self._timeout)

    def _finish(self, event: TokenEvent) -> None:
        if not self._done.done():
            self._done.set_result(event)

    def _timeout(self) -> None:
        self.timed_out = True
        self.state.engine.cancel(self.id)  # the engine answers with an `abort` event (at once if its loop is gone)
        # A loop that is alive but stuck (a forward that never returns) cannot answer: end it from here.
        asyncio.get_running_loop().call_later(ABANDON_GRACE_S, self.state.engine.abandon, self.id)

    async def events(self):
        async for event in self.stream:
            self.tracker.on_event(event)
            yield event

    async def result(self) -> tuple[str, TokenEvent]:
        """(text, final event) of a non-streaming generation."""
        event = await self._done
        return "".join(self.parts), event

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        finished = self.stream.finished if self.stream is not None else self.finished
        if not finished:
            self.state.engine.cancel(self.id)
            self.tracker.finish("abort")
        self.state.release(self.target.base)

    def failure(self, event: TokenEvent) -> APIError | None:
        """The error to report for a final event that is not a normal end (abort, error)."""
        if event.finish_reason == "abort":
            if self.timed_out:
                return APIError(
                    504, f"request timed out after request_timeout_s={self.state.settings.request_timeout_s}"
                )
            return APIError(503, "request aborted: the server is shutting down")
        if event.finish_reason == "error":
            return APIError(500, f"generation failed: {event.error}", "server_error")
        return None


async def start(state: ServiceState, body: SamplingFields, prompt, default_max_tokens: int | None) -> Generation:
    """Admit, tokenize and submit. `prompt(target)` returns the prompt as text or token ids (awaitable)."""
    error = unavailable(state)
    if error is not None:
        if body.model in state.models or body.model in state.adapters:  # draining, engine dead: a refusal
            target = lookup(state, body.model)
            state.metrics.rejected(target.base, target.adapter)
        raise error
    target = lookup(state, body.model)
    if not state.admit(target.base):
        state.metrics.rejected(target.base, target.adapter)
        raise APIError(
            429,
            f"model {target.base!r} has {state.capacity} requests in flight (max_batch_size + max_waiting); "
            "retry later",
            headers={"Retry-After": str(state.settings.retry_after_s)},
        )
    try:
        prompt_value = await prompt(target)
        prompt_ids = await tokenize(target, prompt_value) if isinstance(prompt_value, str) else prompt_value
        max_len = target.loaded.served.max_model_len
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) >= max_len:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; the model's context is max_model_len={max_len}",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = min(default_max_tokens or state.settings.default_max_tokens, max_len - len(prompt_ids))
        params = sampling_params(body, state, max_tokens)
        await ensure_resident(state, target)
        try:
            return Generation(state, target, prompt_ids, params, streaming=body.stream)
        except QueueFullError as exc:
            state.metrics.rejected(target.base, target.adapter)
            raise from_engine_error(exc, state.settings.retry_after_s) from exc
        except EngineError as exc:
            raise from_engine_error(exc, state.settings.retry_after_s) from exc
    except BaseException:
        state.release(target.base)
        raise


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
