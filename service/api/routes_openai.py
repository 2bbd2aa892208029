"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Streaming answers are SSE (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`); chunks are built as plain
dicts and serialised once (the per-token path stays cheap). A non-streaming request waits for its
result while watching the connection: a client that goes away cancels generation at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service.api import chat
from service.api.deps import State, UserAuth
from service.api.errors import APIError
from service.api.generation import Generation, Target, check_text, start, wait_disconnect
from service.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
ERRORS = {
    code: {"description": text}
    for code, text in [
        (400, "invalid request, prompt too long"),
        (401, "missing or wrong API key"),
        (404, "unknown model or adapter"),
        (429, "queue full; see Retry-After"),
        (503, "loading or draining; see Retry-After"),
        (504, "request_timeout_s"),
    ]
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _collect(gen: Generation, request: Request) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt_tokens, completion_tokens); cancels when the client disconnects."""
    work = asyncio.ensure_future(gen.result())
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # client gone (or this handler cancelled): stop generating for it
            work.cancel()
            gen.close()
    text, event = work.result()
    error = gen.failure(event)
    if error is not None:
        raise error
    return text, event.finish_reason, event.prompt_tokens, event.completion_tokens


def _stream(gen: Generation, make_chunk: Callable[[str, str | None], dict], include_usage: bool, first: dict | None):
    """SSE response over the generation's events; `make_chunk(text, finish_reason)` builds one chunk."""

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            async for event in gen.events():
                if event.finish_reason is not None:
                    error = gen.failure(event)
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
                            "usage": _usage(event.prompt_tokens, event.completion_tokens),
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
        body(), media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(gen.close)
    )


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, state: State, _: UserAuth):
    """Text completion of one prompt (a string, a list of one string, or token ids)."""

    async def prompt(target: Target) -> str | list[int]:
        value = body.prompt
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise APIError(
                    400, f"prompt holds {len(value)} strings; this server takes one per request", param="prompt"
                )
            value = value[0]
        if isinstance(value, str):
            check_text(value, state.settings.max_prompt_chars, "prompt")
            return value
        vocab = target.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in value):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(value)

    gen = await start(state, body, prompt, state.settings.default_max_tokens)
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
        return _stream(gen, chunk, include, None)
    try:
        text, finish, prompt_tokens, completion_tokens = await _collect(gen, request)
    finally:
        gen.close()
    return CompletionResponse(
        id=cid,
        created=created,
        model=body.model,
        choices=[CompletionChoice(text=text, finish_reason=finish)],
        usage=Usage(**_usage(prompt_tokens, completion_tokens)),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State, _: UserAuth):
    """Chat completion: the messages are rendered with the model's chat template (see README)."""

    async def prompt(target: Target) -> str:
        tokenizer = target.loaded.served.tokenizer
        for i, message in enumerate(body.messages):
            check_text(chat.message_text(message, i), state.settings.max_prompt_chars, f"messages[{i}].content")
        text = chat.render(
            body.messages, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, body.add_generation_prompt
        )
        check_text(text, state.settings.max_prompt_chars, "messages")
        return text

    gen = await start(state, body, prompt, state.settings.default_chat_max_tokens)
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
        return _stream(gen, chunk, include, first)
    try:
        text, finish, prompt_tokens, completion_tokens = await _collect(gen, request)
    finally:
        gen.close()
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=body.model,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)],
        usage=Usage(**_usage(prompt_tokens, completion_tokens)),
    )


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(state: State, _: UserAuth) -> ModelList:
    """Base models, and adapters with `parent` = their base model, with sizes."""
    cards = []
    for name, loaded in state.models.items():
        params = list(loaded.served.model.parameters())
        cards.append(
            ModelCard(
                id=name,
                created=state.created,
                root=str(loaded.directory),
                max_model_len=loaded.served.max_model_len,
                parameters=sum(p.numel() for p in params),
                size_bytes=sum(p.numel() * p.element_size() for p in params),
            )
        )
    for name, (base, directory) in list(state.adapters.items()):
        info = state.models[base].served.registry.resident.get(name)
        cards.append(
            ModelCard(
                id=name,
                created=state.created,
                root=str(directory),
                parent=base,
                max_model_len=state.models[base].served.max_model_len,
                size_bytes=info.bytes if info else 0,
                lora_rank=info.rank if info else None,
                resident=info is not None,
            )
        )
    return ModelList(data=cards)
