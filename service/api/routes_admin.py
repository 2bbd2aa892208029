"""Adapter admin routes (vLLM request shapes, admin key): `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`.

A load reads the files in a worker thread and installs the weights under the registry's lock between
two engine steps, so running requests are not disturbed and no restart is needed. Paths are accepted
only inside the configured adapter roots, compared after resolving symlinks (so `..` and links that
point outside are refused); weights must be safetensors (the reader refuses pickle files).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from adapters.registry import AdapterCapacityError, AdapterInUseError
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
    409: {"description": "in use / no room"},
}


def allowed_path(state: ServiceState, raw: str) -> Path:
    """The adapter directory, resolved, if it lies inside an adapter root; else a 400."""
    roots = [root.resolve() for root in state.settings.effective_adapter_roots]
    try:
        directory = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise APIError(400, f"lora_path {raw!r} does not exist", param="lora_path") from exc
    inside = [root for root in roots if directory.is_relative_to(root) and directory != root]
    if not inside or not directory.is_dir():
        shown = ", ".join(str(r) for r in roots)
        raise APIError(400, f"lora_path must be a directory inside the adapter roots ({shown})", param="lora_path")
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # the files themselves must not be links out of the root
        file = directory / name
        if file.exists() and not file.resolve().is_relative_to(inside[0]):
            raise APIError(400, f"{name} in lora_path links outside the adapter roots", param="lora_path")
    return directory


@router.post("/load_lora_adapter", response_model=LoraResponse, responses=ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, state: State, _: AdminAuth) -> LoraResponse:
    """Load a PEFT adapter directory (under the adapter roots) and serve it as model `lora_name`."""
    error = unavailable(state)
    if error is not None:
        raise error
    name = body.lora_name
    if name in state.models:
        raise APIError(400, f"{name!r} is a base model name", param="lora_name")
    if name in state.adapters:
        raise APIError(400, f"adapter {name!r} is already loaded; unload it first", param="lora_name")
    directory = allowed_path(state, body.lora_path)
    try:
        if body.base_model_name is not None:
            if body.base_model_name not in state.models:
                raise APIError(404, f"base model {body.base_model_name!r} is not served", param="base_model_name")
            base = body.base_model_name
        else:
            base = await run_in_threadpool(resolve_base, directory, state.models)
        registry = state.models[base].served.registry
        info = await run_in_threadpool(registry.load, name, directory, body.pinned)
    except AdapterCapacityError as exc:
        raise APIError(409, str(exc), "conflict_error") from exc
    except AdapterError as exc:
        raise APIError(400, str(exc), param="lora_path") from exc
    state.adapters[name] = (base, directory)
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
        if body.lora_name in registry.resident:
            registry.unload(body.lora_name)
    except AdapterInUseError as exc:
        raise APIError(409, str(exc), "conflict_error") from exc
    except AdapterError as exc:
        raise APIError(404, str(exc), param="lora_name") from exc
    del state.adapters[body.lora_name]
    return LoraResponse(lora_name=body.lora_name, parent=base, status="unloaded")
