"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Streaming answers are SSE (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`); chunks are built as plain
dicts and serialised once (the per-token path stays cheap). Requests of several choices (`n`, a list of
prompts) are submitted by `generation.start` and waited for or streamed by `choices.py`; a client that
goes away cancels generation at once, quietly. Logprob shapes are built by `logprobs.py`. The OpenAPI
`responses` list every status these routes answer, each error with the `ErrorResponse` schema; app.py
adds 400 and 413 to every operation with a body. `GET /v1/models` shows filesystem paths (`root`) only to admin keys.
"""

from __future__ import annotations

import functools
import logging
import time

from fastapi import APIRouter, Request, Response

from service.api import chat, logprobs
from service.api.choices import close_all, collect, stream, total_usage
from service.api.deps import State, UserAuth, has_admin_key
from service.api.errors import APIError
from service.api.generation import Choice, Controls, api_error, resolve, start
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


def _prompts(value: str | list) -> list[str | list[int]]:
    """The request's prompts: a string, token ids, or a list of either."""
    if isinstance(value, str) or not value or not isinstance(value[0], (str, list)):
        return [value]
    return list(value)


@router.post("/completions", response_model=CompletionResponse, responses=generation_responses("CompletionResponse"))
async def completions(body: CompletionRequest, request: Request, response: Response, state: State, _: UserAuth):
    """Text completion of one or more prompts (strings or token ids), n choices each; see README for echo
    and logprobs."""
    extra_headers = ignored_headers(body)
    response.headers.update(extra_headers)

    client, target = resolve(state, body.model)
    prompts = _prompts(body.prompt)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 is allowed only with echo (scoring the prompt)", param="max_tokens")
    try:
        for prompt in prompts:
            if isinstance(prompt, str):
                client.check_text(prompt, "prompt")
            else:
                client.check_token_ids(target, prompt)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    top = body.logprobs
    controls = Controls(body.max_tokens, state.settings.default_max_tokens, top, body.echo, top if body.echo else None)
    choices = await start(state, body, target, prompts, controls)
    texts = functools.partial(client.token_texts, target)
    created = int(time.time())
    cid = f"cmpl-{choices[0].handle.id}"

    def prompt_logprobs(choice: Choice) -> dict:
        ids = choice.handle.prompt_ids
        return logprobs.completion_logprobs(ids, choice.prompt_logprobs or [None] * len(ids), texts)

    if body.stream:
        offsets: dict[int, int] = {}

        def envelope(entries: list[dict]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": entries}

        def pieces(choice: Choice, event: TokenEvent, opening: bool) -> list[dict]:
            out = []
            if opening and body.echo:
                scored = prompt_logprobs(choice) if top is not None else None
                out.append(
                    {"index": choice.index, "text": choice.prompt_text, "logprobs": scored, "finish_reason": None}
                )
                offsets[choice.index] = len(choice.prompt_text)
            if event.text or event.finish_reason is not None or event.logprobs:
                scored = None
                if top is not None:
                    entries = event.logprobs or []
                    offset = offsets.get(choice.index, 0)
                    scored = logprobs.completion_logprobs([e.token_id for e in entries], entries, texts, offset)
                    offsets[choice.index] = offset + sum(len(t) for t in scored["tokens"])
                out.append(
                    {
                        "index": choice.index,
                        "text": event.text,
                        "logprobs": scored,
                        "finish_reason": event.finish_reason,
                    }
                )
            return out

        options = body.stream_options
        include, continuous = bool(options and options.include_usage), bool(options and options.continuous_usage_stats)
        return stream(choices, state, envelope, pieces, include, continuous, [], extra_headers)
    try:
        results = await collect(choices, request, state)
    finally:
        close_all(choices)
    out = []
    for choice, (text, final) in zip(choices, results):
        scored = None
        if top is not None:
            ids, entries = [], []
            if body.echo:
                ids = list(choice.handle.prompt_ids)
                entries = list(choice.prompt_logprobs or [None] * len(ids))
            ids += [e.token_id for e in choice.handle.logprobs]
            entries += choice.handle.logprobs
            scored = logprobs.completion_logprobs(ids, entries, texts)
        text = choice.prompt_text + text if body.echo else text
        out.append(CompletionChoice(index=choice.index, text=text, logprobs=scored, finish_reason=final.finish_reason))
    finals = {c.index: final for c, (_, final) in zip(choices, results)}
    return CompletionResponse(
        id=cid, created=created, model=body.model, choices=out, usage=Usage(**total_usage(choices, finals))
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
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        for i, message in enumerate(body.messages):
            client.check_text(chat.message_text(message, i), f"messages[{i}].content")
        text = chat.render(
            body.messages, info.chat_template, info.bos_token, info.eos_token, body.add_generation_prompt
        )
        client.check_text(text, "messages")
    except EngineError as exc:
        raise api_error(exc, state) from exc
    top = (body.top_logprobs or 0) if body.logprobs else None
    controls = Controls(body.max_tokens or body.max_completion_tokens, state.settings.default_chat_max_tokens, top)
    choices = await start(state, body, target, [text], controls)
    texts = functools.partial(client.token_texts, target)
    created = int(time.time())
    cid = f"chatcmpl-{choices[0].handle.id}"
    if body.stream:

        def envelope(entries: list[dict]) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": entries,
            }

        def pieces(choice: Choice, event: TokenEvent, opening: bool) -> list[dict]:
            finish = event.finish_reason
            if not (event.text or finish is not None or event.logprobs):
                return []
            delta = {"content": event.text} if event.text or finish is None else {}
            scored = logprobs.chat_logprobs(event.logprobs or [], texts) if top is not None else None
            return [{"index": choice.index, "delta": delta, "logprobs": scored, "finish_reason": finish}]

        first = [
            envelope(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for c in choices
        ]
        options = body.stream_options
        include, continuous = bool(options and options.include_usage), bool(options and options.continuous_usage_stats)
        return stream(choices, state, envelope, pieces, include, continuous, first, extra_headers)
    try:
        results = await collect(choices, request, state)
    finally:
        close_all(choices)
    out = [
        ChatChoice(
            index=choice.index,
            message=AssistantMessage(content=text),
            logprobs=logprobs.chat_logprobs(choice.handle.logprobs, texts) if top is not None else None,
            finish_reason=final.finish_reason,
        )
        for choice, (text, final) in zip(choices, results)
    ]
    finals = {c.index: final for c, (_, final) in zip(choices, results)}
    return ChatCompletionResponse(
        id=cid, created=created, model=body.model, choices=out, usage=Usage(**total_usage(choices, finals))
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
