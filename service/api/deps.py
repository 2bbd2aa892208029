"""Service state and the routes' dependencies (as `Annotated` aliases): state, API-key checks.

`ServiceState` holds what the routes share: settings, the engine (None while models load), the
served models and known adapters, the metrics, the per-model admission counters (the bounded queue
checked before any work) and the drain flag. Keys are compared in constant time with
`hmac.compare_digest`, against every configured key (no early exit on a match).
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import APIError
from service.api.metrics import Metrics
from service.engine import Engine
from service.loading import LoadedModel
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    models: dict[str, LoadedModel] = field(default_factory=dict)
    adapters: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name -> (base model, directory)
    created: int = 0  # unix time the models were loaded (for /v1/models)
    loading: bool = True
    load_error: str | None = None
    draining: bool = False
    in_flight: dict[str, int] = field(default_factory=dict)  # admitted, unfinished requests per model
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        """Requests per model admitted at once: the running batch plus the waiting queue."""
        return self.settings.max_batch_size + self.settings.max_waiting

    def admit(self, model: str) -> bool:
        """Reserve one request slot of `model`; False when the model's queue is full."""
        with self.lock:
            count = self.in_flight.get(model, 0)
            if count >= self.capacity:
                return False
            self.in_flight[model] = count + 1
            return True

    def release(self, model: str) -> None:
        with self.lock:
            self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)

    def total_in_flight(self) -> int:
        with self.lock:
            return sum(self.in_flight.values())

    def not_ready_reason(self) -> str | None:
        if self.load_error is not None:
            return f"loading failed: {self.load_error}"
        if self.loading or self.engine is None:
            return "loading models"
        if self.draining:
            return "draining: shutting down"
        if not self.engine.alive:
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


def check_ops_key(request: Request, state: State) -> None:
    if state.settings.protect_ops_endpoints:
        check_user_key(request, state)


UserAuth = Annotated[None, Depends(check_user_key)]
AdminAuth = Annotated[None, Depends(check_admin_key)]
OpsAuth = Annotated[None, Depends(check_ops_key)]
