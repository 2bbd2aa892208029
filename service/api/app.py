"""`create_app(settings)`: the FastAPI application, its routers, error handlers, offline docs and lifespan.

The lifespan starts loading the models in a background thread, so the server answers `/health` (200)
and `/ready` (503, "loading models") while weights load; when loading ends the engine starts and
`/ready` turns 200. `/docs` is Swagger UI served from the `fastapi_offline` package's bundled assets:
it needs no CDN.
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

from service.api import errors, routes_admin, routes_health, routes_openai
from service.api.deps import ServiceState
from service.api.metrics import Metrics
from service.engine import Engine, EngineConfig, SchedulerConfig
from service.loading import load_all
from service.settings import Settings

log = logging.getLogger(__name__)
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def start_engine(state: ServiceState) -> None:
    """Load every model and adapter, start the engine and mark the service ready (blocking)."""
    settings = state.settings
    try:
        models, adapters = load_all(settings)
        # The API's admission (ServiceState.admit) bounds each model's queue; the engine's own bound counts
        # submissions not yet moved into its scheduler too, so it gets the whole capacity as a backstop.
        capacity = settings.max_batch_size + settings.max_waiting
        scheduler = SchedulerConfig(settings.max_batch_size, settings.max_tokens_per_step, capacity)
        engine = Engine(EngineConfig(scheduler=scheduler), on_step=state.metrics.on_step)
        for name, loaded in models.items():
            engine.add_model(loaded.served)
            state.metrics.add_model(name, loaded.served.registry)
        engine.start()
    except Exception as exc:  # reported by /ready and ends the server (see server.py)
        log.exception("loading failed")
        state.load_error = str(exc) or type(exc).__name__
        return
    state.models, state.adapters, state.created = models, adapters, int(time.time())
    state.engine = engine
    state.loading = False
    log.info("ready: models %s, adapters %s", ", ".join(models), ", ".join(adapters) or "none")


def create_app(settings: Settings, load: bool = True) -> FastAPI:
    """The app; with load=False the caller fills `app.state.service` itself (tests, embedding)."""
    state = ServiceState(settings=settings, metrics=Metrics(settings.metrics_top_adapters))
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
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_health.router)
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

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
