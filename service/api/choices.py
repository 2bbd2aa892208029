"""Responses of one or many choices (`n`, several prompts): waiting for them, streaming them, usage.

`collect` waits for every choice of a non-streaming request while watching the connection (a client
that goes away cancels them all at once, quietly). `stream` merges the choices' event streams into one
SSE response: each chunk carries one choice (with its `index`), in the order events arrive; an error in
any choice ends the stream with one error event. Usage: prompt tokens are counted once per prompt (its
first choice computed it; the others reused its blocks), completion tokens summed over every choice,
as vLLM reports them. `stream_options.include_usage` adds a usage chunk after the last choice ends;
`continuous_usage_stats` puts the choice's own usage so far on every chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service.api.deps import ServiceState
from service.api.errors import APIError
from service.api.generation import Choice, api_error, wait_disconnect
from service.engine import TokenEvent

CLIENT_CLOSED = 499  # nginx's "client closed request": the status of an answer nobody reads
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Envelope = Callable[[list[dict]], dict]  # choice entries -> one chunk (id, object, created, model)
Pieces = Callable[[Choice, TokenEvent, bool], list[dict]]  # (choice, event, first of the choice) -> entries


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # served from the prefix cache
    }


def total_usage(choices: list[Choice], finals: dict[int, TokenEvent]) -> dict:
    """Prompt tokens once per prompt (its first choice), completion tokens of every choice."""
    leaders = [c for c in choices if c.handle is c.leader]
    return usage(
        sum(finals[c.index].prompt_tokens for c in leaders),
        sum(finals[c.index].completion_tokens for c in choices),
        sum(finals[c.index].cached_tokens for c in leaders),
    )


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _failure(choice: Choice, event: TokenEvent, state: ServiceState) -> APIError | None:
    error = choice.handle.failure(event)
    return api_error(error, state) if error is not None else None


def close_all(choices: list[Choice]) -> None:
    for choice in choices:
        choice.handle.close()


async def collect(choices: list[Choice], request: Request, state: ServiceState) -> list[tuple[str, TokenEvent]]:
    """(text, final event) of each choice; cancels them all when the client disconnects."""

    async def every() -> list[tuple[str, TokenEvent]]:  # a task, not gather(): its cancellation is quiet
        return [await c.handle.result() for c in choices]

    work = asyncio.ensure_future(every())
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not work.done()
        if gone:  # client gone (or this handler cancelled: then that CancelledError goes on): stop generating
            work.cancel()
            close_all(choices)
    if gone:  # an answer nobody reads, instead of an exception (and a traceback in the log)
        raise APIError(CLIENT_CLOSED, "the client closed the connection; generation cancelled")
    results = work.result()
    for choice, (_, event) in zip(choices, results):
        error = _failure(choice, event, state)
        if error is not None:
            raise error
    return results


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """Every choice's events as they arrive (one choice: its own stream, no extra task)."""
    if len(choices) == 1:
        async for event in choices[0].handle.events():
            yield choices[0], event
        return
    queue: asyncio.Queue[tuple[Choice, TokenEvent]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for event in choice.handle.events():
            queue.put_nowait((choice, event))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    remaining = len(choices)
    try:
        while remaining:
            choice, event = await queue.get()
            remaining -= event.finish_reason is not None
            yield choice, event
    finally:
        for task in tasks:
            task.cancel()


def stream(
    choices: list[Choice],
    state: ServiceState,
    envelope: Envelope,
    pieces: Pieces,
    include_usage: bool,
    continuous_usage: bool,
    first: list[dict],
    headers: dict[str, str],
) -> StreamingResponse:
    """SSE response over the choices' events; `pieces` builds each event's choice entries."""

    async def body() -> AsyncIterator[str]:
        finals: dict[int, TokenEvent] = {}
        seen: set[int] = set()
        try:
            for chunk in first:
                if include_usage or continuous_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            async for choice, event in _merged(choices):
                if event.finish_reason is not None:
                    error = _failure(choice, event, state)
                    if error is not None:
                        yield sse(error.body())
                        break
                    finals[choice.index] = event
                opening = choice.index not in seen
                seen.add(choice.index)
                for entry in pieces(choice, event, opening):
                    chunk = envelope([entry])
                    if continuous_usage:
                        chunk["usage"] = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                    elif include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
                if len(finals) == len(choices):
                    if include_usage:
                        yield sse({**envelope([]), "usage": total_usage(choices, finals)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            close_all(choices)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
        background=BackgroundTask(close_all, choices),
    )
