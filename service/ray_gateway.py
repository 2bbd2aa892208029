"""The Ray Serve HTTP ingress of modelserve (`Gateway`): routing keys, the adapter catalog, errors in our shape.

The gateway reads each generation request's `model` and prompt and picks Ray's `multiplexed_model_id` for it:
- prefix-aware routing (`ray_prefix_routing`): the key `model#hash` of the request's leading text (the first
  `PREFIX_CHARS` characters of a completion's prompt, or of a chat's messages as `role: content` lines; a
  blake2b hash, stable across processes). Once a key has been seen, requests carrying it go to the replica
  that advertises it, i.e. the one whose prefix cache holds that prefix (under that adapter: the key
  includes the model name, and the engine's prefix cache never shares blocks across adapters anyway);
- adapter-aware routing (`ray_adapter_routing`): a prefix not seen yet goes by the adapter's name, to a
  replica where the adapter is resident;
- otherwise no id: Ray's default choice (the less loaded of two random replicas).
Every replica advertises the keys of the requests it served (its own bounded LRU in Ray's multiplexing), so
the router learns where each prefix and adapter lives. Ray's `max_queued_requests` backpressure becomes our
429 `rate_limit_error` with `Retry-After`; a replica that dies mid-request ends that request with a 503
`service_unavailable` (a final SSE error chunk when streaming). Replica answers are relayed unchanged.

The adapter catalog (name -> directory) is the configured adapters plus those loaded through
`POST /v1/load_lora_adapter`; an unload removes the adapter from the catalog (404 from then on).
"""

# No `from __future__ import annotations`: Ray Serve's ingress must see the route signatures' real types.
import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.api.errors import APIError

REPLICA_HEADER = "x-modelserve-replica"
ADAPTER_LOAD_HEADER = "x-modelserve-adapter-load"  # "cold" (loaded for this request) or "warm"
DIRECTORY_ACTOR = "modelserve-replica-directory"
GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
PREFIX_CHARS = 256  # leading characters hashed into the prefix key (about 4-8 KV blocks of 16 tokens)
SEEN_KEYS = 4096  # prefix keys the gateway remembers having routed (beyond: routed as if new)
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding"}


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """replica id -> its metrics address (host:port), for Prometheus service discovery."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def register(self, replica: str, address: str) -> None:
        self.targets[replica] = address

    def unregister(self, replica: str) -> None:
        self.targets.pop(replica, None)

    def list(self) -> dict[str, str]:
        return dict(self.targets)


def replica_directory() -> Any:
    return ReplicaDirectory.options(name=DIRECTORY_ACTOR, namespace="serve", get_if_exists=True).remote()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def leading_text(path: str, payload: dict[str, Any]) -> str:
    """The request's first PREFIX_CHARS characters of prompt: what its first KV blocks are computed from."""
    if path == "/v1/chat/completions":
        messages = payload.get("messages")
        messages = messages if isinstance(messages, list) else []
        lines = [f"{m.get('role')}: {_text(m.get('content'))}\n" for m in messages if isinstance(m, dict)]
        return "".join(lines)[:PREFIX_CHARS]
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt if isinstance(prompt[0], int) else prompt[0]  # token ids, or the first of a batch
    if isinstance(prompt, list):
        return json.dumps(prompt[: PREFIX_CHARS // 4])
    return prompt[:PREFIX_CHARS] if isinstance(prompt, str) else ""


def prefix_key(model: str, path: str, payload: dict[str, Any]) -> str | None:
    """`model#hash` of the request's leading text (None without a usable prompt); stable across processes."""
    text = leading_text(path, payload)
    if not text:
        return None
    return f"{model}#{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


gateway_app = FastAPI(title="modelserve gateway", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, message: str, retry_after: int | None = None, **fields: Any) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return APIError(status, message, headers=headers, **fields).response()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(gateway_app)
class Gateway:
    """The HTTP ingress: prefix- and adapter-aware dispatch to the engine replicas, errors in our shape."""

    def __init__(
        self,
        engine: DeploymentHandle,
        adapters: dict[str, str],
        routing: bool,
        retry_after_s: int,
        prefix_routing: bool = True,
    ) -> None:
        self.engine = engine
        self.adapters = dict(adapters)  # the catalog: name -> directory
        self.unloaded: set[str] = set()
        self.routing = routing
        self.prefix_routing = prefix_routing
        self.retry_after_s = retry_after_s
        self.seen: OrderedDict[str, None] = OrderedDict()  # prefix keys routed before (LRU, SEEN_KEYS)
        self.directory = replica_directory()

    @gateway_app.get("/ray/targets")
    async def targets(self) -> JSONResponse:
        """Prometheus HTTP service discovery: one target per live replica, labelled `replica`."""
        found = await self.directory.list.remote()
        for replica, address in list(found.items()):  # a killed replica never unregisters: drop what refuses
            host, _, port = address.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=1.0)
                writer.close()
            except (OSError, asyncio.TimeoutError):
                del found[replica]
                self.directory.unregister.remote(replica)
        return JSONResponse([{"targets": [addr], "labels": {"replica": rid}} for rid, addr in sorted(found.items())])

    def _route(self, path: str, payload: Any) -> tuple[str | None, list[str], str | None]:
        """(multiplexed_model_id or None, the keys the serving replica advertises, the prefix key)."""
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return None, [], None
        adapter_key = model if self.routing and model in self.adapters else None
        key = prefix_key(model, path, payload) if self.prefix_routing else None
        keys = [k for k in (adapter_key, key) if k is not None]
        if key is not None and key in self.seen:
            self.seen.move_to_end(key)
            return key, keys, key
        return adapter_key, keys, key

    def _remember(self, key: str | None) -> None:
        """A prefix key a replica has answered for (so advertises to Ray's router): route by it from now on."""
        if key is not None:
            self.seen[key] = None
            self.seen.move_to_end(key)
        while len(self.seen) > SEEN_KEYS:
            self.seen.popitem(last=False)

    @gateway_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        path = "/" + path
        adapter, streaming, multiplexed, keys, key = None, False, None, [], None
        if request.method == "POST" and path in GENERATION_PATHS:
            try:
                payload = json.loads(body)
                model, streaming = payload.get("model"), bool(payload.get("stream"))
            except (ValueError, AttributeError):
                payload, model = None, None  # the replica answers the 400
            if isinstance(model, str) and model in self.unloaded:
                return error_response(404, f"adapter {model!r} is not loaded", param="model", code="model_not_found")
            if isinstance(model, str) and model in self.adapters:
                adapter = (model, self.adapters[model])
            multiplexed, keys, key = self._route(path, payload)
        elif request.method == "POST" and path == "/v1/unload_lora_adapter":
            try:
                name = json.loads(body)["lora_name"]
            except (ValueError, KeyError, TypeError):
                name = None  # the replica answers the 400
            if isinstance(name, str) and name in self.adapters:
                # The replica makes a catalog adapter resident, then its own route unloads it (auth checked
                # there): the answer is the replica's, unchanged. A replica holding it is preferred.
                adapter, multiplexed = (name, self.adapters[name]), name
        options: dict[str, Any] = {"stream": True}
        if multiplexed is not None:
            options["multiplexed_model_id"] = multiplexed
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_HEADERS]
        call = self.engine.options(**options).handle.remote(
            request.method, path, request.url.query.encode(), headers, body, adapter, keys
        )
        try:
            stream = call.__aiter__()
            status, out_headers = await stream.__anext__()
            if status < 400:
                self._remember(key)
            if not streaming:  # buffered: a replica lost mid-way is a clean 503, not a cut body
                response = Response(b"".join([chunk async for chunk in stream]), status_code=status)
                response.headers.update(dict(out_headers))
                if status == 200 and request.method == "POST":
                    self._record_admin(path, body)
                return response
        except BackPressureError:
            return error_response(
                429, "all replicas are busy: max_queued_requests reached", self.retry_after_s, code="queue_full"
            )
        except (RayError, StopAsyncIteration, RuntimeError) as exc:
            return error_response(503, f"the replica serving this request failed: {type(exc).__name__}", 1)
        return StreamingResponse(self._relay(stream), status_code=status, headers=dict(out_headers))

    async def _relay(self, stream: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except (RayError, RuntimeError) as exc:
            error = APIError(503, f"the replica serving this request failed: {type(exc).__name__}").body()
            yield f"data: {json.dumps(error)}\n\n".encode()

    def _record_admin(self, path: str, body: bytes) -> None:
        """Keep the catalog in step with a successful admin load or unload."""
        if path == "/v1/load_lora_adapter":
            request = json.loads(body)
            self.adapters[request["lora_name"]] = str(Path(request["lora_path"]).expanduser().resolve())
            self.unloaded.discard(request["lora_name"])
        elif path == "/v1/unload_lora_adapter":
            name = json.loads(body)["lora_name"]
            self.adapters.pop(name, None)
            self.unloaded.add(name)
