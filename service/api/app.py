"""`create_app(settings)`: the FastAPI application, its routers, error handlers, offline docs and lifespan.

The lifespan starts loading the models in a background thread, so the server answers `/health` (200)
and `/ready` (503, "loading models") while weights load; when loading ends the engine starts and
`/ready` turns 200. `/docs` is Swagger UI served from the `fastapi_offline` package's bundled assets:
it needs no CDN. Request bodies over `max_request_bytes` are refused (413) by `BodyLimitMiddleware`
before anything parses them. The OpenAPI document says what the server does: FastAPI's 422 is
replaced by the 400 the error handlers answer, 413 is listed on every operation with a body, and every
error response has the error schema (`describe_errors`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api import errors, routes_admin, routes_health, routes_openai, routes_page, routes_tokenize, tracing
from service.api.body_limit import BodyLimitMiddleware
from service.api.deps import ServiceState
from service.api.metrics import Metrics
from service.api.schemas import ChatCompletionChunk, ErrorResponse
from service.loading import build_client
from service.settings import Settings

log = logging.getLogger(__name__)
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def start_engine(state: ServiceState) -> None:
    """Load every model and adapter, start the engine behind its client and mark the service ready (blocking)."""
    try:
        observer = tracing.observer(state.metrics, state.settings)  # the metrics, wrapped when tracing is on
        client = build_client(state.settings, observer, on_step=state.metrics.on_step)
        for info in client.models():
            registry = client.catalog.registries.get(info.name)
            state.metrics.add_model(info.name, registry, info.device, info.dtype or "", info.quantization or "")
    except Exception as exc:  # reported by /ready and ends the server (see server.py)
        log.exception("loading failed")
        state.load_error = str(exc) or type(exc).__name__
        return
    state.client, state.created = client, int(time.time())
    state.loading = False
    names = [info.name for info in client.models()]
    adapters = [card.name for card in client.adapters()]
    log.info("ready: models %s, adapters %s", ", ".join(names), ", ".join(adapters) or "none")


RETRY_AFTER = {
    "description": "Seconds to wait before retrying (`retry_after_s`).",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}


def describe_errors(schema: dict) -> dict:
    """The OpenAPI document as the server answers: 400 (not 422) for invalid input, 413 on operations with
    a body, the `ErrorResponse` schema on every 4xx/5xx response that names no other, and the
    `Retry-After` header on every 429 and 503."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for model in (ErrorResponse, ChatCompletionChunk):  # referenced by hand: error responses, SSE events
        if model.__name__ not in components:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            had_422 = responses.pop("422", None) is not None
            if had_422 or "requestBody" in operation:
                responses.setdefault("400", {"description": "invalid request"})
            if "requestBody" in operation:
                responses.setdefault("413", {"description": "request body over max_request_bytes"})
            for code, response in responses.items():
                if code[0] in "45" and "content" not in response:
                    response["content"] = error_content
                if code in ("429", "503"):
                    response.setdefault("headers", {})["Retry-After"] = RETRY_AFTER
    return schema


def create_app(settings: Settings, load: bool = True) -> FastAPI:
    """The app; with load=False the caller fills `app.state.service` itself (tests, embedding)."""
    metrics = Metrics(settings.metrics_top_adapters, settings.request_timeout_s, settings.request_log_json)
    state = ServiceState(settings=settings, metrics=metrics)
    state.metrics.ready_probe = lambda: state.not_ready_reason() is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            threading.Thread(target=start_engine, args=(state,), name="modelserve-load", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            state.engine.accepting = False
            state.engine.stop()

    app = FastAPI(
        title="modelserve",
        description="OpenAI-compatible serving of a distilled student, a teacher and an MoE model with "
        'per-request LoRA adapters. Errors: `{"error": {"message", "type", "param", "code"}}`.',
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = state
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    tracing.install(app, settings)  # OpenTelemetry spans of /v1/* when otel_traces_endpoint is set
    app.include_router(routes_openai.router)
    app.include_router(routes_tokenize.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_health.router)
    app.include_router(routes_page.router)
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = describe_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="modelserve API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    return app
