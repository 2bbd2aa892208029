"""Service state and the routes' dependencies (as `Annotated` aliases): state, API-key checks.

`ServiceState` holds what the routes share: settings, the metrics, the engine client (None while
models load; it owns the models, the adapter catalog and admission) and the drain flag. Keys are
compared in constant time with `hmac.compare_digest`, against every configured key (no early exit on
a match).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import APIError
from service.api.metrics import Metrics
from service.engine import Engine
from service.engine.client import EngineClient
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    client: EngineClient | None = None
    created: int = 0  # unix time the models were loaded (for /v1/models)
    loading: bool = True
    load_error: str | None = None
    draining: bool = False

    @property
    def engine(self) -> Engine | None:
        return self.client.engine if self.client is not None else None

    def total_in_flight(self) -> int:
        return self.client.in_flight() if self.client is not None else 0

    def not_ready_reason(self) -> str | None:
        if self.load_error is not None:
            return f"loading failed: {self.load_error}"
        if self.loading or self.client is None:
            return "loading models"
        if self.draining:
            return "draining: shutting down"
        if not self.client.engine.alive:
            return "the engine loop is not running"
        return None


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list) -> bool:
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.get_secret_value().encode())
    return found


def check_user_key(request: Request, state: State) -> None:
    settings = state.settings
    if not settings.api_keys and not settings.admin_api_keys:
        return
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not (_matches(token, settings.api_keys) | _matches(token, settings.admin_api_keys)):
        raise APIError(401, "invalid API key", code="invalid_api_key")


def check_admin_key(request: Request, state: State) -> None:
    settings = state.settings
    if not settings.api_keys and not settings.admin_api_keys:
        return
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing admin API key: send 'Authorization: Bearer <admin key>'", code="invalid_api_key")
    if not settings.admin_api_keys:
        raise APIError(401, "admin routes are disabled: no admin API key is configured", code="invalid_api_key")
    if not _matches(token, settings.admin_api_keys):
        raise APIError(401, "this route needs an admin API key", code="invalid_api_key")


def has_admin_key(request: Request, settings: Settings) -> bool:
    """True when the request carries a configured admin key (never when no admin keys are configured)."""
    token = _bearer(request)
    return token is not None and bool(settings.admin_api_keys) and _matches(token, settings.admin_api_keys)


def check_ops_key(request: Request, state: State) -> None:
    if state.settings.protect_ops_endpoints:
        check_user_key(request, state)


UserAuth = Annotated[None, Depends(check_user_key)]
AdminAuth = Annotated[None, Depends(check_admin_key)]
OpsAuth = Annotated[None, Depends(check_ops_key)]
