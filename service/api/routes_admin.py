"""Adapter admin routes (vLLM request shapes, admin key): `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`.

A load reads the files in a worker thread and installs the weights under the registry's lock between
two engine steps, so running requests are not disturbed and no restart is needed. Paths are accepted
only inside the configured adapter roots, compared after resolving symlinks (so `..` and links that
point outside are refused); weights must be safetensors (the reader refuses pickle files).

Answers: a bad path or bad adapter files (truncated, not UTF-8 JSON, wrong field types, empty or
non-finite weights, ...) are a 400 naming the file and the reason; a name already served or being
loaded right now is a 409 `conflict_error` (the name is reserved before any file is read, so of two
concurrent loads of one name exactly one succeeds), and so is no room (every resident adapter pinned
or in use) and an adapter in use on unload.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from adapters.peft_format import AdapterError
from adapters.registry import AdapterCapacityError, AdapterInUseError, resolve_under_roots
from service.api.deps import AdminAuth, ServiceState, State
from service.api.errors import APIError
from service.api.generation import unavailable
from service.api.schemas import LoadLoraRequest, LoraResponse, UnloadLoraRequest
from service.loading import resolve_base

router = APIRouter(prefix="/v1", tags=["adapter admin"])
ERRORS = {
    400: {"description": "bad adapter or path"},
    401: {"description": "missing or non-admin key"},
    404: {"description": "unknown adapter or base"},
    409: {"description": "name taken or being loaded / in use / no room"},
    503: {"description": "load: models still loading, draining, or engine not running; see Retry-After"},
}


def _loading(request: Request) -> set[str]:
    """Adapter names whose admin load is under way in this app (reserved before any await)."""
    app_state = request.app.state
    if not hasattr(app_state, "adapters_loading"):
        app_state.adapters_loading = set()
    return app_state.adapters_loading


def allowed_path(state: ServiceState, raw: str) -> Path:
    """The adapter directory, resolved, if it lies inside an adapter root; else a 400 naming the reason."""
    try:
        return resolve_under_roots(raw, state.settings.effective_adapter_roots)
    except AdapterError as exc:
        raise APIError(400, f"lora_path: {exc}", param="lora_path") from exc


@router.post("/load_lora_adapter", response_model=LoraResponse, responses=ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, state: State, _: AdminAuth, request: Request) -> LoraResponse:
    """Load a PEFT adapter directory (under the adapter roots) and serve it as model `lora_name`."""
    error = unavailable(state)
    if error is not None:
        raise error
    name = body.lora_name
    if name in state.models:
        raise APIError(400, f"{name!r} is a base model name", param="lora_name")
    loading = _loading(request)
    if name in state.adapters or name in loading:
        what = "is already loaded; unload it first" if name in state.adapters else "is being loaded by another request"
        raise APIError(409, f"adapter {name!r} {what}", "conflict_error", param="lora_name")
    loading.add(name)  # no await between the check and here: the name is ours until the finally
    try:
        directory = allowed_path(state, body.lora_path)
        if body.base_model_name is not None:
            if body.base_model_name not in state.models:
                raise APIError(404, f"base model {body.base_model_name!r} is not served", param="base_model_name")
            base = body.base_model_name
        else:
            base = await run_in_threadpool(resolve_base, directory, state.models)
        registry = state.models[base].served.registry
        info = await run_in_threadpool(registry.load, name, directory, body.pinned)
        state.adapters[name] = (base, directory)
    except (AdapterCapacityError, AdapterInUseError) as exc:
        raise APIError(409, str(exc), "conflict_error", param="lora_name") from exc
    except AdapterError as exc:
        raise APIError(400, str(exc), param="lora_path") from exc
    except (OSError, ValueError) as exc:  # a path in the config (base_model_name_or_path) the OS refuses
        raise APIError(400, f"adapter {body.lora_path[:200]!r} cannot be loaded: {exc}", param="lora_path") from exc
    finally:
        loading.discard(name)
    return LoraResponse(lora_name=name, parent=base, status="loaded", lora_rank=info.rank, size_bytes=info.bytes)


@router.post("/unload_lora_adapter", response_model=LoraResponse, responses=ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, state: State, _: AdminAuth) -> LoraResponse:
    """Unload an adapter; refused (409) while requests use it."""
    entry = state.adapters.get(body.lora_name)
    if entry is None:
        raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name", code="model_not_found")
    base = entry[0]
    registry = state.models[base].served.registry
    try:
        registry.unload(body.lora_name)
    except AdapterInUseError as exc:
        raise APIError(409, str(exc), "conflict_error", param="lora_name") from exc
    except AdapterError:  # not resident (LRU evicted it): forgetting it is enough
        pass
    state.adapters.pop(body.lora_name, None)
    return LoraResponse(lora_name=body.lora_name, parent=base, status="unloaded")
