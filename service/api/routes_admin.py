"""Adapter admin routes (vLLM request shapes, admin key): `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`.

Both go through the engine client's adapter catalog (service/engine/catalog.py): a load reads the
files in a worker thread and installs the weights under the registry's lock between two engine
steps, so running requests are not disturbed and no restart is needed. Paths are accepted
only inside the configured adapter roots, compared after resolving symlinks (so `..` and links that
point outside are refused); weights must be safetensors (the reader refuses pickle files).

Answers: a bad path or bad adapter files (truncated, not UTF-8 JSON, wrong field types, empty or
non-finite weights, ...) are a 400 naming the file and the reason; a name already served or being
loaded right now is a 409 `conflict_error` (the name is reserved before any file is read, so of two
concurrent loads of one name exactly one succeeds), and so is no room (every resident adapter pinned
or in use) and an adapter in use on unload.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import AdminAuth, State
from service.api.generation import api_error, client_of
from service.api.schemas import LoadLoraRequest, LoraResponse, UnloadLoraRequest
from service.engine import EngineError, UnknownModelError

router = APIRouter(prefix="/v1", tags=["adapter admin"])
ERRORS = {
    400: {"description": "bad adapter or path"},
    401: {"description": "missing or non-admin key"},
    404: {"description": "unknown adapter or base"},
    409: {"description": "name taken or being loaded / in use / no room"},
    503: {"description": "load: models still loading, draining, or engine not running; see Retry-After"},
}


@router.post("/load_lora_adapter", response_model=LoraResponse, responses=ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, state: State, _: AdminAuth) -> LoraResponse:
    """Load a PEFT adapter directory (under the adapter roots) and serve it as model `lora_name`."""
    client = client_of(state)
    try:
        card = await client.load_adapter(body.lora_name, body.lora_path, body.base_model_name, body.pinned)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    return LoraResponse(
        lora_name=card.name, parent=card.base, status="loaded", lora_rank=card.rank, size_bytes=card.size_bytes
    )


@router.post("/unload_lora_adapter", response_model=LoraResponse, responses=ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, state: State, _: AdminAuth) -> LoraResponse:
    """Unload an adapter; refused (409) while requests use it."""
    if state.client is None:
        raise api_error(UnknownModelError(f"adapter {body.lora_name!r} is not loaded", param="lora_name"), state)
    try:
        card = state.client.unload_adapter(body.lora_name)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    return LoraResponse(lora_name=card.name, parent=card.base, status="unloaded")
