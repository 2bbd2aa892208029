"""modelserve as a Ray Serve application: replicas, autoscaling, prefix- and adapter-aware routing (`--ray`).

Two deployments:
- `EngineReplica` (N replicas, autoscaled on ongoing requests per replica): each holds the same FastAPI app and
  engine as `modelserve serve` (`create_app`), loaded before the replica reports healthy, and served the same
  way, by uvicorn, but on a private loopback port. A request the gateway hands to the replica is forwarded to
  that port with `httpx.AsyncClient` and the response streamed back chunk by chunk, status and headers
  unchanged. (Not `httpx.ASGITransport`: it buffers the whole response body, so SSE would arrive at the end;
  not Ray's `@serve.ingress` on the replica: the gateway must reach it through a handle carrying a
  `multiplexed_model_id`, which ingress routes do not take.) Closing the stream (a client gone) closes the
  loopback connection, which the app sees as a disconnect and aborts the request.
- `Gateway` (`service/ray_gateway.py`, one light replica, the HTTP ingress): picks the routing key.

Adapter residency per replica is explicit (`AdapterResidency`): a bounded LRU of the adapters the replica loaded
(`ray_max_adapters_per_replica`); making room evicts the least recently used one that no request of this
replica is using, through the engine's registry (`registry.unload`). Ray's model multiplexing only learns
which routing keys a replica serves: a loader that returns the key itself (a plain token, nothing to free),
in Ray's own LRU of `ray_max_adapters_per_replica + PREFIX_KEYS_PER_REPLICA` keys per replica. An unload
reaches a replica that holds the adapter (or makes it resident first) and is answered by the app's own route.

Metrics: each replica serves its own `/metrics` on a port of its own and registers it in a named actor; the
gateway's `GET /ray/targets` lists them as Prometheus HTTP service discovery with a `replica` label
(deploy/ray/prometheus.yml).
"""

# No `from __future__ import annotations`: Ray Serve's ingress must see the route signatures' real types.
import argparse
import asyncio
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import ray
import uvicorn
from ray import serve

from service.api.errors import APIError
from service.engine import EngineError, UnknownModelError
from service.ray_gateway import (
    ADAPTER_LOAD_HEADER,
    HOP_HEADERS,
    REPLICA_HEADER,
    Gateway,
    replica_directory,
)
from service.settings import Settings

__all__ = ["ADAPTER_LOAD_HEADER", "REPLICA_HEADER", "EngineReplica", "Gateway", "app_builder", "build_app"]
log = logging.getLogger(__name__)
PREFIX_KEYS_PER_REPLICA = 256  # prefix routing keys a replica advertises to Ray's router (LRU beyond)


class AdapterResidency:
    """The adapters one replica holds: a bounded LRU, evicted through the engine's registry, never by the GC."""

    def __init__(self, state: Any, capacity: int) -> None:
        self.state, self.capacity = state, capacity
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.using: dict[str, int] = {}  # adapter -> requests of this replica using it now
        self.lock = asyncio.Lock()  # one load or eviction at a time
        self.cold_loads = 0

    async def acquire(self, name: str, directory: Path) -> bool:
        """Make `name` resident and mark it in use; True when this call loaded it (a cold load)."""
        self.using[name] = self.using.get(name, 0) + 1
        try:
            async with self.lock:
                cold = self.state.client.catalog.base_of(name) is None
                if cold:
                    await self._make_room(name)
                    await self._load(name, directory)
                self.lru[name] = None
                self.lru.move_to_end(name)
                return cold
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        self.using[name] -= 1
        if not self.using[name]:
            del self.using[name]

    def forget(self, name: str) -> None:
        """`name` was unloaded here by the admin route."""
        self.lru.pop(name, None)

    async def _make_room(self, name: str) -> None:
        for victim in [v for v in self.lru if v != name]:
            if len(self.lru) < self.capacity:
                return
            if self.using.get(victim) or not await asyncio.to_thread(self._unload, victim):
                continue  # in use: tried again at the next load; the registry's own limit still holds
            del self.lru[victim]

    def _unload(self, name: str) -> bool:
        try:
            self.state.client.unload_adapter(name)
        except UnknownModelError:  # unloaded by the admin route meanwhile
            return True
        except EngineError as exc:  # still used by a running sequence: keep it
            log.info("adapter %s not evicted: %s", name, exc)
            return False
        return True

    async def _load(self, name: str, directory: Path) -> None:
        await asyncio.to_thread(self.state.client.catalog.load_trusted, name, directory)
        self.cold_loads += 1


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


def serve_on_loopback(app: Any) -> tuple[uvicorn.Server, int]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) in a daemon thread; (server, port) once it listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, timeout_keep_alive=300)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="modelserve-replica-http", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the replica's loopback server did not start in 30 s")
        time.sleep(0.01)
    return server, sock.getsockname()[1]


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
        self.adapters = AdapterResidency(self.state, settings.ray_max_adapters_per_replica)
        self.server, port = serve_on_loopback(self.app)
        self.base_url = f"http://127.0.0.1:{port}"
        self.max_connections = settings.ray_max_ongoing_requests
        self.client: httpx.AsyncClient | None = None  # made on the replica's event loop, at the first request

        async def advertise(key: str) -> str:
            return key  # a plain token: Ray evicting a key frees nothing, it only stops preferring this replica

        self.advertise = serve.multiplexed(
            max_num_models_per_replica=settings.ray_max_adapters_per_replica + PREFIX_KEYS_PER_REPLICA
        )(advertise)
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
            self.server.should_exit = True
            if self.state.engine is not None:
                self.state.engine.accepting = False
                self.state.engine.stop()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    async def handle(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
        adapter: tuple[str, str] | None = None,
        keys: list[str] | tuple[str, ...] = (),
    ) -> AsyncIterator[Any]:
        """Run one HTTP request through the app; yields (status, headers), then body chunks."""
        for key in keys:  # tell Ray's router this replica serves these routing keys
            await self.advertise(key)
        extra = [(REPLICA_HEADER, self.replica_id)]
        if adapter is not None:
            name = adapter[0]
            try:
                cold = await self.adapters.acquire(name, Path(adapter[1]))
            except EngineError as exc:  # no room (every resident adapter busy: 409) or a bad adapter directory (400)
                error = APIError(exc.status, str(exc), exc.kind, param="model")
                yield (error.status, [("content-type", "application/json"), *extra])
                yield json.dumps(error.body()).encode()
                return
            extra.append((ADAPTER_LOAD_HEADER, "cold" if cold else "warm"))
        try:
            if self.client is None:
                limits = httpx.Limits(max_connections=None, max_keepalive_connections=self.max_connections)
                self.client = httpx.AsyncClient(base_url=self.base_url, timeout=None, limits=limits)
            url = path + (f"?{query.decode('latin-1')}" if query else "")
            request = self.client.build_request(method, url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
            try:
                out = [(k, v) for k, v in response.headers.multi_items() if k not in HOP_HEADERS]
                yield (response.status_code, out + extra)
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()
            if adapter is not None and path == "/v1/unload_lora_adapter" and response.status_code == 200:
                self.adapters.forget(adapter[0])
        finally:
            if adapter is not None:
                self.adapters.release(adapter[0])


def build_app(settings: Settings, prefix_routing: bool | None = None) -> serve.Application:
    """The Ray Serve application for `settings` (replicas, autoscaling and backpressure from its ray_* fields);
    `prefix_routing` overrides `settings.ray_prefix_routing` (default on)."""
    if prefix_routing is None:
        prefix_routing = bool(getattr(settings, "ray_prefix_routing", True))
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
    return gateway.bind(
        engine.bind(replica_settings), adapters, settings.ray_adapter_routing, settings.retry_after_s, prefix_routing
    )


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
