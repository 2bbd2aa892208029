"""modelserve as a Ray Serve application: replicas, autoscaling, adapter-aware routing (`modelserve serve --ray`).

Two deployments:
- `EngineReplica` (N replicas, autoscaled on ongoing requests per replica): each holds the same FastAPI app and
  engine as `modelserve serve` (`create_app`), loaded before the replica reports healthy, and runs every HTTP
  request it is given through that app in-process (an ASGI call), streaming the response back.
- `Gateway` (one light replica, the HTTP ingress): reads each request's `model`, and for an adapter asks Ray's
  model multiplexing (`multiplexed_model_id` = the adapter name) to prefer a replica where the adapter is
  resident, falling back to Ray's default choice (the less loaded of two random replicas). Ray's
  `max_queued_requests` backpressure becomes our 429 `rate_limit_error` with `Retry-After`; a replica that dies
  mid-request ends that request with a 503 `service_unavailable` (a final SSE error chunk when streaming).

Adapters are a catalog kept by the gateway (name -> directory): the ones configured at start and those loaded
through `POST /v1/load_lora_adapter` (validated and loaded by one replica, then recorded). Every replica loads
an adapter on first use (a cold load) and keeps at most `ray_max_adapters_per_replica`, least recently used
evicted, so admin loads reach every replica. An unload removes the adapter from the catalog (404 from then
on) and from the replica that answered; the others drop it by eviction.

Metrics: each replica serves its own `/metrics` on a port of its own and registers it in a named actor; the
gateway's `GET /ray/targets` lists them as Prometheus HTTP service discovery with a `replica` label
(deploy/ray/prometheus.yml).
"""

# No `from __future__ import annotations`: Ray Serve's ingress must see the route signatures' real types.
import argparse
import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from adapters.peft_format import AdapterError
from adapters.registry import AdapterCapacityError
from service.api.errors import APIError
from service.settings import Settings

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-modelserve-replica"
ADAPTER_LOAD_HEADER = "x-modelserve-adapter-load"  # "cold" (loaded for this request) or "warm"
DIRECTORY_ACTOR = "modelserve-replica-directory"
GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}


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


class _ResidentAdapter:
    """What the multiplexing cache holds per adapter; Ray calls `__del__` when it evicts one."""

    def __init__(self, replica: "EngineReplica", name: str) -> None:
        self.replica, self.name, self.released = replica, name, False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.replica.drop_adapter(self.name)


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True


def start_metrics_server(render: Any, host: str) -> _MetricsServer:
    """A plain HTTP server answering GET /metrics with `render()`, on a free port, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = render() if self.path.split("?")[0] == "/metrics" else b"not found\n"
            self.send_response(200 if self.path.startswith("/metrics") else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = _MetricsServer((host, 0), Handler)
    threading.Thread(target=server.serve_forever, name="modelserve-metrics", daemon=True).start()
    return server


@serve.deployment
class EngineReplica:
    """One replica: the modelserve app and engine, loaded before the replica reports healthy."""

    def __init__(self, settings: Settings) -> None:
        import torch

        from service.api.app import create_app, start_engine

        torch.set_num_threads(settings.torch_threads or max(1, int(settings.ray_replica_cpus)))
        self.app = create_app(settings, load=False)
        self.state = self.app.state.service
        start_engine(self.state)  # blocking: Ray routes nothing here until the constructor returns
        if self.state.load_error is not None:
            raise RuntimeError(f"loading failed: {self.state.load_error}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.cold_loads = 0
        self._pending: dict[str, str] = {}  # adapter name -> directory, for the multiplexed loader
        self._using: dict[str, int] = {}  # adapter name -> requests of this replica using it now

        async def load(name: str) -> _ResidentAdapter:
            return await self._load_adapter(name)

        # Ray's model multiplexing: an LRU of resident adapters whose ids Ray's router prefers for requests
        # carrying that multiplexed_model_id (wired at init so the cache size comes from the settings).
        self.resident_adapter = serve.multiplexed(max_num_models_per_replica=settings.ray_max_adapters_per_replica)(
            load
        )
        self.metrics_server = start_metrics_server(self.state.metrics.render, settings.ray_metrics_host)
        host = ray.util.get_node_ip_address() if settings.ray_metrics_host in ("0.0.0.0", "::") else None
        address = f"{host or settings.ray_metrics_host}:{self.metrics_server.server_address[1]}"
        self.directory = replica_directory()
        self.directory.register.remote(self.replica_id, address)

    def check_health(self) -> None:
        reason = self.state.not_ready_reason()
        if reason is not None:
            raise RuntimeError(reason)

    def __del__(self) -> None:
        try:
            self.directory.unregister.remote(self.replica_id)
            self.metrics_server.shutdown()
            if self.state.engine is not None:
                self.state.engine.accepting = False
                self.state.engine.stop()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    async def _load_adapter(self, name: str) -> _ResidentAdapter:
        """Load adapter `name` here (a cold load) unless it is resident already."""
        from service.loading import resolve_base

        state = self.state
        if name not in state.adapters:
            directory = Path(self._pending[name])
            base = await asyncio.to_thread(resolve_base, directory, state.models)
            await asyncio.to_thread(state.models[base].served.registry.load, name, directory, False)
            state.adapters[name] = (base, directory)
            self.cold_loads += 1
        return _ResidentAdapter(self, name)

    def drop_adapter(self, name: str) -> None:
        entry = self.state.adapters.get(name)
        if entry is None or self._using.get(name):  # a request about to use it: the registry's LRU evicts later
            return
        registry = self.state.models[entry[0]].served.registry
        try:
            if name in registry.resident:
                registry.unload(name)
            del self.state.adapters[name]
        except Exception:  # in use: the engine's registry evicts it later by its own LRU
            log.info("adapter %s still in use on replica %s: left resident", name, self.replica_id)

    async def handle(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes, adapter: Any = None
    ) -> AsyncIterator[Any]:
        """Run one HTTP request through the app; yields (status, headers), then body chunks."""
        load, name = None, None
        if adapter is not None:
            name, directory = adapter
            self._pending[name] = directory
            self._using[name] = self._using.get(name, 0) + 1
            before = self.cold_loads
            try:
                await self.resident_adapter(name)
            except AdapterError as exc:  # no room (every resident adapter busy) or a bad adapter directory
                self._using[name] -= 1
                error = APIError(409 if isinstance(exc, AdapterCapacityError) else 400, str(exc), param="model")
                yield (error.status, [("content-type", "application/json"), (REPLICA_HEADER, self.replica_id)])
                yield json.dumps(error.body()).encode()
                return
            load = "cold" if self.cold_loads > before else "warm"
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        done = asyncio.Event()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "client": ("ray-serve", 0),
            "server": ("modelserve", 0),
            "app": self.app,
        }
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    extra = [(REPLICA_HEADER, self.replica_id)] + ([(ADAPTER_LOAD_HEADER, load)] if load else [])
                    out = [(k.decode(), v.decode()) for k, v in message.get("headers", []) if k != b"content-length"]
                    yield (message["status"], out + extra)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
        finally:
            done.set()
            if not task.done():
                task.cancel()
            if name is not None:
                self._using[name] -= 1


gateway_app = FastAPI(title="modelserve gateway", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, message: str, retry_after: int | None = None, **fields: Any) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return APIError(status, message, headers=headers, **fields).response()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(gateway_app)
class Gateway:
    """The HTTP ingress: adapter-aware dispatch to the engine replicas, errors in the modelserve shape."""

    def __init__(self, engine: DeploymentHandle, adapters: dict[str, str], routing: bool, retry_after_s: int) -> None:
        self.engine = engine
        self.adapters = dict(adapters)  # the catalog: name -> directory
        self.unloaded: set[str] = set()
        self.parents: dict[str, str] = {}  # adapter -> base model, as the replica that loaded it answered
        self.routing = routing
        self.retry_after_s = retry_after_s
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

    @gateway_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        path = "/" + path
        adapter, streaming = None, False
        if request.method == "POST" and path in GENERATION_PATHS:
            try:
                payload = json.loads(body)
                model, streaming = payload.get("model"), bool(payload.get("stream"))
            except (ValueError, AttributeError):
                model = None  # the replica answers the 400
            if isinstance(model, str) and model in self.unloaded:
                return error_response(404, f"adapter {model!r} is not loaded", param="model", code="model_not_found")
            if isinstance(model, str) and model in self.adapters:
                adapter = (model, self.adapters[model])
        unload = None
        if request.method == "POST" and path == "/v1/unload_lora_adapter":
            try:
                unload = json.loads(body)["lora_name"]
            except (ValueError, KeyError, TypeError):
                unload = None  # the replica answers the 400
            if unload not in self.adapters:
                unload = None
        options: dict[str, Any] = {"stream": True}
        if adapter is not None and self.routing:
            options["multiplexed_model_id"] = adapter[0]
        elif unload is not None:
            options["multiplexed_model_id"] = unload  # prefer a replica holding it
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        call = self.engine.options(**options).handle.remote(
            request.method, path, request.url.query.encode(), headers, body, adapter
        )
        try:
            stream = call.__aiter__()
            status, out_headers = await stream.__anext__()
            if not streaming:  # buffered: a replica lost mid-way is a clean 503, not a cut body
                chunks = [chunk async for chunk in stream]
                if unload is not None and status == 404:  # in the catalog, but not resident on that replica
                    status, chunks = 200, [json.dumps(self._unloaded(unload)).encode()]
                    out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-type"]
                    out_headers.append(("content-type", "application/json"))
                response = Response(b"".join(chunks), status_code=status)
                response.headers.update(dict(out_headers))
                if status == 200 and request.method == "POST":
                    self._record_admin(path, body, response.body)
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

    def _unloaded(self, name: str) -> dict[str, Any]:
        return {"object": "lora_adapter", "lora_name": name, "parent": self.parents.get(name, ""), "status": "unloaded"}

    def _record_admin(self, path: str, body: bytes, answer: bytes) -> None:
        """Keep the catalog in step with a successful admin load or unload."""
        if path == "/v1/load_lora_adapter":
            request = json.loads(body)
            self.adapters[request["lora_name"]] = str(Path(request["lora_path"]).expanduser().resolve())
            self.unloaded.discard(request["lora_name"])
            self.parents[request["lora_name"]] = json.loads(answer).get("parent", "")
        elif path == "/v1/unload_lora_adapter":
            name = json.loads(body)["lora_name"]
            self.adapters.pop(name, None)
            self.unloaded.add(name)


def build_app(settings: Settings) -> serve.Application:
    """The Ray Serve application for `settings` (replicas, autoscaling and backpressure from its ray_* fields)."""
    engine_options: dict[str, Any] = {
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "max_queued_requests": settings.ray_max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.ray_replica_cpus},
        "health_check_period_s": settings.ray_health_check_period_s,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
    }
    if settings.ray_num_replicas is not None:
        engine_options["num_replicas"] = settings.ray_num_replicas
    else:
        engine_options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        }
    engine = EngineReplica.options(**engine_options)
    adapters = {name: str(Path(d).resolve()) for name, d in settings.adapters.items()}
    replica_settings = settings.model_copy(update={"adapters": {}})  # loaded on first use, per replica
    # The gateway only relays: it must admit everything the replicas and Ray's queue can hold (the 429s come
    # from that queue), or Ray's default of 5 ongoing requests per replica would throttle the whole app.
    replicas = settings.ray_num_replicas or settings.ray_max_replicas
    gateway = Gateway.options(
        max_ongoing_requests=2
        * (replicas * settings.ray_max_ongoing_requests + max(settings.ray_max_queued_requests, 0))
        + 64
    )
    return gateway.bind(engine.bind(replica_settings), adapters, settings.ray_adapter_routing, settings.retry_after_s)


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run service.ray_app:app_builder ray_num_replicas=2 ...`: Settings from the environment and args
    (dict and list values as JSON, e.g. `models='{"student": "artifacts/student"}'`)."""
    values = {key: json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v for key, v in args.items()}
    return build_app(Settings(**values))


def serve_ray(args: argparse.Namespace) -> int:
    """`modelserve serve --ray`: deploy on the Ray cluster at `ray_address` (or a local one) and block."""
    from service.api.server import settings_from_args

    try:
        settings = settings_from_args(args, ray_address=getattr(args, "ray_address", None))
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    ray.init(address=settings.ray_address, namespace="serve")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name="modelserve", route_prefix="/")
    log.info("modelserve on Ray Serve at http://%s:%d (Ctrl-C stops it)", settings.host, settings.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete("modelserve")
    return 0
