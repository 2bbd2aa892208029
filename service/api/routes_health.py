"""Operational routes: `GET /health` (process alive), `GET /ready` (can serve now), `GET /metrics`.

Open unless `protect_ops_endpoints` is set. `/ready` is 503 while models load, while draining after
SIGTERM, and when the engine loop has died. `/health` means "the process and its engine loop are
alive": 200 while loading and draining, 503 once the engine is dead (too many failed steps in a row,
see service/engine/engine.py), so a liveness probe restarts the process.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import OpsAuth, State
from service.api.schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(state: State, _: OpsAuth):
    """200 while the process and its engine loop are alive; 503 once the engine loop is dead."""
    engine = state.engine
    if engine is None or engine.alive:
        return HealthResponse(status="ok")
    body = HealthResponse(status="engine dead", detail=f"the engine loop is not running: {engine.error!r}")
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})


@router.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(state: State, _: OpsAuth):
    """200 when requests can be served; 503 while loading, draining, or when the engine loop is dead."""
    reason = state.not_ready_reason()
    if reason is None:
        return HealthResponse(status="ready")
    body = HealthResponse(status="not ready", detail=reason).model_dump()
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})


@router.get("/metrics", response_class=Response)
async def metrics(state: State, _: OpsAuth) -> Response:
    """Prometheus text exposition of every modelserve_* metric."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
