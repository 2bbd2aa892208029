"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Streaming answers are SSE (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`); chunks are built as plain
dicts and serialised once (the per-token path stays cheap). A non-streaming request waits for its
result while watching the connection: a client that goes away cancels generation at once, quietly
(no traceback: the handler ends with a response nobody reads). The OpenAPI `responses` list every
status these routes answer, each error with the `ErrorResponse` schema; app.py adds 400 and 413 to
every operation with a body. `GET /v1/models` shows filesystem paths (`root`) only to admin keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service.api import chat
from service.api.deps import ServiceState, State, UserAuth, has_admin_key
from service.api.errors import APIError
from service.api.generation import api_error, resolve, start, wait_disconnect
from service.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from service.engine import EngineError, TokenEvent
from service.engine.client import RequestHandle

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "invalid request, or prompt too long"),
        (401, "missing or wrong API key"),
        (404, "unknown model or adapter"),
        (409, "an evicted adapter could not be reloaded: no room (every resident adapter pinned or in use)"),
        (413, "request body over max_request_bytes"),
        (429, "the model's queue is full; see Retry-After"),
        (500, "the engine failed while generating (never for what a client sent)"),
        (503, "loading, draining, engine not running, or aborted on shutdown; see Retry-After"),
        (504, "request_timeout_s passed; generation was cancelled"),
    ]
}
CLIENT_CLOSED = 499  # nginx's "client closed request": the status of an answer nobody reads
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
IGNORED_HEADER = "x-modelserve-ignored-fields"  # unknown request fields this server ignored
log = logging.getLogger(__name__)


def ignored_headers(body: SamplingFields) -> dict[str, str]:
    """Log the unknown fields a request carried and name them (ASCII, the first 20) in a response header."""
    names = body.ignored_fields()
    if not names:
        return {}
    # A header value takes visible ASCII only (a field name may hold anything, newlines included).
    shown = ["".join(c if 32 < ord(c) < 127 and c != "," else "?" for c in name[:64]) for name in names[:20]]
    log.info("model %s: ignored unknown request fields %s", body.model, ", ".join(shown))
    return {IGNORED_HEADER: ",".join(shown)}


def generation_responses(chunk: str) -> dict:
    """`responses` of a generation route: JSON, or with `stream: true` SSE events (each event's `data` is a
    `chunk` schema as JSON, an error, or `[DONE]`); then every error. app.py puts `chunk` in components."""
    data = {
        "oneOf": [
            {"const": "[DONE]"},
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [
                        {"$ref": f"#/components/schemas/{chunk}"},
                        {"$ref": "#/components/schemas/ErrorResponse"},
                    ]
                },
            },
        ],
        "description": f"A {chunk} as JSON; an error after the stream started is one ErrorResponse event; "
        "the last event is `[DONE]`.",
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    ok = {
        "description": "The completion (JSON), or with `stream: true` a server-sent event stream.",
        "content": {"text/event-stream": {"schema": event}},
    }
    return {200: ok, **ERRORS}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # served from the prefix cache
    }


def _failure(gen: RequestHandle, event: TokenEvent, state: ServiceState) -> APIError | None:
    error = gen.failure(event)
    return api_error(error, state) if error is not None else None


async def _collect(gen: RequestHandle, request: Request, state: ServiceState) -> tuple[str, str, int, int, int]:
    """(text, finish_reason, prompt_tokens, completion_tokens, cached_tokens); cancels when the client disconnects."""
    work = asyncio.ensure_future(gen.result())
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not work.done()
        if gone:  # client gone (or this handler cancelled: then that CancelledError goes on): stop generating
            work.cancel()
            gen.close()
    if gone:  # an answer nobody reads, instead of an exception (and a traceback in the log)
        raise APIError(CLIENT_CLOSED, "the client closed the connection; generation cancelled")
    text, event = work.result()
    error = _failure(gen, event, state)
    if error is not None:
        raise error
    return text, event.finish_reason, event.prompt_tokens, event.completion_tokens, event.cached_tokens


def _stream(
    gen: RequestHandle,
    state: ServiceState,
    make_chunk: Callable[[str, str | None], dict],
    include_usage: bool,
    first: dict | None,
    headers: dict[str, str],
):
    """SSE response over the generation's events; `make_chunk(text, finish_reason)` builds one chunk."""

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            async for event in gen.events():
                if event.finish_reason is not None:
                    error = _failure(gen, event, state)
                    if error is not None:
                        yield _sse(error.body())
                        break
                    chunk = make_chunk(event.text, event.finish_reason)
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                    if include_usage:
                        usage = {
                            **make_chunk("", None),
                            "choices": [],
                            "usage": _usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens),
                        }
                        yield _sse(usage)
                    break
                if event.text:
                    chunk = make_chunk(event.text, None)
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            gen.close()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}, background=BackgroundTask(gen.close)
    )


@router.post("/completions", response_model=CompletionResponse, responses=generation_responses("CompletionResponse"))
async def completions(body: CompletionRequest, request: Request, response: Response, state: State, _: UserAuth):
    """Text completion of one prompt (a string, a list of one string, or token ids)."""
    extra_headers = ignored_headers(body)
    response.headers.update(extra_headers)

    client, target = resolve(state, body.model)
    value = body.prompt
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]  # the schema allows one string per request
    try:
        if isinstance(value, str):
            client.check_text(value, "prompt")
        else:
            client.check_token_ids(target, value)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    gen = await start(state, body, target, value, state.settings.default_max_tokens)
    created = int(time.time())
    cid = f"cmpl-{gen.id}"
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(gen, state, chunk, include, None, extra_headers)
    try:
        text, finish, prompt_tokens, completion_tokens, cached = await _collect(gen, request, state)
    finally:
        gen.close()
    return CompletionResponse(
        id=cid,
        created=created,
        model=body.model,
        choices=[CompletionChoice(text=text, finish_reason=finish)],
        usage=Usage(**_usage(prompt_tokens, completion_tokens, cached)),
    )


@router.post(
    "/chat/completions", response_model=ChatCompletionResponse, responses=generation_responses("ChatCompletionChunk")
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, state: State, _: UserAuth
):
    """Chat completion: the messages are rendered with the model's chat template (see README)."""
    extra_headers = ignored_headers(body)
    response.headers.update(extra_headers)

    client, target = resolve(state, body.model)
    info = client.model(target.base)
    try:
        for i, message in enumerate(body.messages):
            client.check_text(chat.message_text(message, i), f"messages[{i}].content")
        text = chat.render(
            body.messages, info.chat_template, info.bos_token, info.eos_token, body.add_generation_prompt
        )
        client.check_text(text, "messages")
    except EngineError as exc:
        raise api_error(exc, state) from exc
    gen = await start(state, body, target, text, state.settings.default_chat_max_tokens)
    created = int(time.time())
    cid = f"chatcmpl-{gen.id}"
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict:
            delta = {"content": text} if text or finish is None else {}
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        include = bool(body.stream_options and body.stream_options.include_usage)
        first = chunk("", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        if include:
            first["usage"] = None
        return _stream(gen, state, chunk, include, first, extra_headers)
    try:
        text, finish, prompt_tokens, completion_tokens, cached = await _collect(gen, request, state)
    finally:
        gen.close()
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=body.model,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)],
        usage=Usage(**_usage(prompt_tokens, completion_tokens, cached)),
    )


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(request: Request, state: State, _: UserAuth) -> ModelList:
    """Base models, and adapters with `parent` = their base model, with sizes; `root` (a server path) only
    for an admin key."""
    admin = has_admin_key(request, state.settings)
    client = state.client
    if client is None:  # still loading
        return ModelList(data=[])
    models = {info.name: info for info in client.models()}
    cards = [
        ModelCard(
            id=info.name,
            created=state.created,
            root=str(info.directory) if admin else None,
            max_model_len=info.max_model_len,
            parameters=info.parameters,
            size_bytes=info.size_bytes,
            dtype=info.dtype,
            quantization=info.quantization,
        )
        for info in models.values()
    ]
    for card in client.adapters():
        cards.append(
            ModelCard(
                id=card.name,
                created=state.created,
                root=str(card.directory) if admin else None,
                parent=card.base,
                max_model_len=models[card.base].max_model_len,
                size_bytes=card.size_bytes,
                lora_rank=card.rank,
                resident=card.resident,
                dtype=models[card.base].dtype,
            )
        )
    return ModelList(data=cards)
