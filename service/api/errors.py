"""The error shape `{"error": {"message", "type", "param", "code"}}` and the exception handlers.

Everything a client can send wrong ends as a 4xx in this shape: pydantic validation errors and
malformed JSON become 400 (not FastAPI's 422), engine refusals keep their status (400/404/429/503),
and every 429 and 503 carries `Retry-After` (`retry_after_s`; the handlers add it where the raiser did
not). Only a fault of the server itself is a 500. Each 4xx refusal (except 429, an admission
rejection) is counted in `modelserve_requests_refused_total{code}` here (`count_refused`).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import EngineError

log = logging.getLogger(__name__)

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    499: "client_closed_request",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or STATUS_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: EngineError, retry_after: int) -> APIError:
    headers = {"Retry-After": str(retry_after)} if exc.status in (429, 503) else None
    param = exc.param or ("model" if exc.status == 404 else None)
    return APIError(exc.status, str(exc), exc.kind, param=param, code=exc.code, headers=headers)


# Location parts that name a union member, not a field: `str`, `list[str]`, the prompt's tags (schemas.py).
UNION_MEMBER = re.compile(r"(str|int|float|bool|none|text|texts|ids|(list|dict)\[.*\])")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not UNION_MEMBER.fullmatch(str(part))]
    kind = first.get("type", "")
    if kind == "unknown_field":  # schemas._Request: the field is in ctx, the location is its model
        loc.append(str((first.get("ctx") or {}).get("field", "")))
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    if kind in ("extra_forbidden", "unknown_field"):
        return f"unknown field {param!r}: this server does not support it", param
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message, param


RETRY_STATUSES = (429, 503)


def count_refused(app: object, status: int) -> None:
    """Count a refused request on the app's metrics (`Metrics.refuse` ignores all but invalid-request 4xx)."""
    metrics = getattr(getattr(getattr(app, "state", None), "service", None), "metrics", None)
    if metrics is not None:  # None: an app without the service state (tests, embedding)
        metrics.refuse(status)


def _respond(request: Request, error: APIError) -> JSONResponse:
    count_refused(request.app, error.status)
    return _with_retry_after(request, error)


def _with_retry_after(request: Request, error: APIError) -> JSONResponse:
    if error.status in RETRY_STATUSES and not any(k.lower() == "retry-after" for k in error.headers):
        service = getattr(request.app.state, "service", None)
        error.headers = {**error.headers, "Retry-After": str(service.settings.retry_after_s if service else 1)}
    return error.response()


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _respond(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body is not valid JSON in UTF-8"
        return _respond(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", "server_error").response()
