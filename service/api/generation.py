"""One generation request from the route to the engine client: the part shared by completions and chat.

A request's path reads straight down: the route checks readiness (503) and resolves the name through
the client (404), builds its prompts (text or token ids), then `start` admits each choice (prompts x
n; 429 with Retry-After, before any tokenization or model work), tokenizes and validates them (400),
and submits them;
the client's `RequestHandle` delivers the events. Every `EngineError` the client raises becomes the
API error of its status here, and nowhere else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from starlette.requests import Request

from service.api.deps import ServiceState
from service.api.errors import APIError, from_engine_error
from service.api.schemas import SamplingFields
from service.api.structured import guided_spec
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


@dataclass(frozen=True)
class Controls:
    """What a route asks beyond the shared sampling fields (their spelling differs per endpoint)."""

    max_tokens: int | None
    default_max_tokens: int
    logprobs: int | None = None  # top logprobs per generated token (None: no logprobs)
    echo: bool = False  # completions: the prompt text before the completion
    prompt_logprobs: int | None = None  # echo with logprobs: score the prompt


@dataclass
class Choice:
    """One choice of a response: `index` = prompt_index x n + its number among the prompt's n choices."""

    index: int
    prompt_index: int
    handle: RequestHandle
    leader: RequestHandle  # the prompt's first choice: it computed the prompt (and scored it, with echo)
    prompt_text: str = ""  # the prompt as text (echo)

    @property
    def prompt_logprobs(self) -> list | None:
        return self.leader.prompt_logprobs


async def start(
    state: ServiceState, body: SamplingFields, target: Target, prompts: list[str | list[int]], controls: Controls
) -> list[Choice]:
    """Admit, tokenize, validate and submit every choice (prompts x n); always `close()` their handles.

    A prompt's n choices share its computation through the prefix cache: the first choice is submitted
    alone, and the others once its first event came (its prompt is computed and its full blocks are
    registered), so they take those blocks instead of prefilling again; only the first choice scores
    the prompt when echo asks prompt logprobs (the others copy them). With a `seed`, choice i of a
    prompt samples from seed + i."""
    client, n = state.client, body.n
    count = len(prompts) * n
    if count > client.config.capacity:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={n} choices is over the model's {client.config.capacity} requests in flight",
            param="n" if n > 1 else "prompt",
        )
    admitted = 0
    handles: list[RequestHandle] = []
    try:
        for _ in range(count):
            client.admit(target)
            admitted += 1
        prepared = []
        for prompt in prompts:
            ids = await client.tokenize(target, prompt) if isinstance(prompt, str) else prompt
            keep = body.truncate_prompt_tokens
            truncated = keep is not None and keep < len(ids)
            if truncated:
                ids = ids[-keep:]
            params = client.sampling_params(
                len(ids),
                target,
                controls.max_tokens,
                controls.default_max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                seed=body.seed,
                stop=body.stop_list(),
                ignore_eos=body.ignore_eos,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=body.logit_bias_ids(),
                stop_token_ids=body.stop_token_ids,
                min_tokens=body.min_tokens,
                logprobs=controls.logprobs,
                prompt_logprobs=controls.prompt_logprobs,
                guided=guided_spec(body),  # structured output (service/api/structured.py)
            )
            text = ""
            if controls.echo:
                text = prompt if isinstance(prompt, str) and not truncated else client.detokenize(target, ids)
            prepared.append((ids, params, text))
        choices: list[Choice] = []
        for j in range(n):  # the first choice of every prompt, then (once those computed their prompts) the rest
            if j == 1:
                await asyncio.wait([c.handle.started for c in choices])
            for p, (ids, params, text) in enumerate(prepared):
                if j > 0:
                    seed = None if params.seed is None else (params.seed + j) % 2**63
                    params = replace(params, seed=seed, prompt_logprobs=None)
                handle = await client.generate(target, ids, params, streaming=body.stream)
                handles.append(handle)
                leader = handle if j == 0 else choices[p].handle
                choices.append(Choice(p * n + j, p, handle, leader, text))
        choices.sort(key=lambda c: c.index)
        return choices
    except BaseException as exc:
        for handle in handles:  # each releases its own admission place
            handle.close()
        for _ in range(admitted - len(handles)):
            client.release(target)
        if isinstance(exc, EngineError):
            raise api_error(exc, state) from exc
        raise


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
