"""One generation request from the route to the engine client: the part shared by completions and chat.

A request's path reads straight down: the route checks readiness (503) and resolves the name through
the client (404), builds its prompt (text or token ids), then `start` admits it (429 with
Retry-After, before any tokenization or model work), tokenizes and validates it (400), and submits it;
the client's `RequestHandle` delivers the events. Every `EngineError` the client raises becomes the
API error of its status here, and nowhere else.
"""

from __future__ import annotations

from starlette.requests import Request

from service.api.deps import ServiceState
from service.api.errors import APIError, from_engine_error
from service.api.schemas import SamplingFields
from service.engine import EngineError
from service.engine.client import EngineClient, RequestHandle, Target


def unavailable(state: ServiceState) -> APIError | None:
    reason = state.not_ready_reason()
    if reason is None:
        return None
    return APIError(503, f"service unavailable: {reason}", headers={"Retry-After": str(state.settings.retry_after_s)})


def client_of(state: ServiceState, model: str | None = None) -> EngineClient:
    """The client when the service can serve (else a 503; a refusal is counted for a served `model`)."""
    error = unavailable(state)
    if error is not None:
        if model is not None and state.client is not None and state.client.knows(model):
            state.client.reject(state.client.resolve(model))  # draining or engine dead: a refusal
        raise error
    return state.client


def api_error(exc: EngineError, state: ServiceState) -> APIError:
    return from_engine_error(exc, state.settings.retry_after_s)


def resolve(state: ServiceState, model: str) -> tuple[EngineClient, Target]:
    client = client_of(state, model)
    try:
        return client, client.resolve(model)
    except EngineError as exc:
        raise api_error(exc, state) from exc


async def start(
    state: ServiceState, body: SamplingFields, target: Target, prompt: str | list[int], default_max_tokens: int
) -> RequestHandle:
    """Admit, tokenize, validate and submit; returns the request's handle (always `close()` it)."""
    client = state.client
    try:
        client.admit(target)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    try:
        prompt_ids = await client.tokenize(target, prompt) if isinstance(prompt, str) else prompt
        params = client.sampling_params(
            len(prompt_ids),
            target,
            body.max_tokens or getattr(body, "max_completion_tokens", None),
            default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
        )
        return await client.generate(target, prompt_ids, params, streaming=body.stream)
    except EngineError as exc:
        client.release(target)
        raise api_error(exc, state) from exc
    except BaseException:
        client.release(target)
        raise


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
