"""`BodyLimitMiddleware`: a request body over `max_request_bytes` is a 413 before anything parses it.

A pure ASGI middleware (not Starlette's `BaseHTTPMiddleware`, which would buffer and wrap the body).
Two checks: a declared `Content-Length` over the limit is answered at once, before the app runs or a
byte of the body is read; a body without one (chunked) is counted as its chunks arrive, and the read
that crosses the limit raises `BodyTooLarge`. FastAPI re-raises an `HTTPException` met while reading
the body, so the app's error handler answers it (413, the error shape) before any JSON parsing; if
the exception reaches this middleware instead, it answers the same 413 itself. The connection is
kept: the server discards the unread rest of the body, so the client can read the 413.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import APIError, count_refused


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body read so far passes the limit."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        if size is None:
            message = f"the request body exceeds max_request_bytes={limit}"
        else:
            message = f"the request body has {size} bytes, over max_request_bytes={limit}"
        super().__init__(413, message)


async def send_413(scope: Scope, send: Send, exc: BodyTooLarge) -> None:
    count_refused(scope.get("app"), 413)
    body = json.dumps(APIError(413, exc.detail).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_413(scope, send, BodyTooLarge(self.max_bytes, declared))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:  # else a response is already on its way: nothing more to say
                await send_413(scope, send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself refuses a malformed Content-Length
    return None
