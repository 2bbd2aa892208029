"""Benchmark: modelserve on Ray Serve (service/ray_app.py): 1 vs 2 replicas, adapter- and prefix-aware routing.

One local Ray cluster, the tiny test zoo (random llama + PEFT adapters), each replica one torch thread.
In the same run, alternating configurations, each repeated:

- throughput: `concurrency` clients send 32-token greedy completions (`ignore_eos`) of the base model for
  `requests` requests; generated tokens per second with 1 and with 2 replicas (ratio = 2 / 1);
- cold loads: 2 replicas holding at most 2 adapters each, traffic over 6 adapters (a seeded, skewed draw:
  a few hot adapters and a tail); the share of requests that loaded their adapter on the replica that served
  them (`x-modelserve-adapter-load: cold`), with adapter-aware routing (Ray's multiplexing keyed by adapter)
  and without (Ray's default choice);
- prefix-cache hit rate: 2 replicas, each with a KV pool that holds about half of `SYSTEMS` long system
  prompts, traffic of short user turns after one of those prompts (seeded draw); prompt tokens served from
  the prefix cache over prompt tokens looked up (`modelserve_prefix_cache_hits_total /
  modelserve_prefix_cache_queries_total` of every replica's /metrics, summed), with prefix-aware routing
  (Ray's multiplexing keyed by model + a hash of the prompt's first 256 characters) and without. Each
  configuration is a fresh deployment (cold caches).

On a 2-core machine two replicas plus Ray's proxy, gateway and controller share two cores, so the throughput
ratio says more about the overhead than about scaling; on a multi-core or multi-GPU node it is the figure to
watch.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from matplotlib.figure import Figure

from bench.common import write_report

ADAPTERS = 6
SYSTEMS = 6  # long system prompts (~180 tokens each, ~11 KV blocks) shared by the prefix traffic
WORDS = "the a quick lazy dog cat runs over under model serve token cache prefix block engine replica".split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zoo(root: Path) -> dict[str, Path]:
    from tests.api.zoo import build_zoo

    zoo = build_zoo(root)
    for i in range(ADAPTERS):  # distinct names over the zoo's three adapter weights
        directory = root / "adapters" / f"x{i}"
        shutil.copytree(zoo[f"a{i % 3 + 1}"], directory, dirs_exist_ok=True)
        zoo[f"x{i}"] = directory
    return zoo


async def _drive(url: str, models: list[str], concurrency: int, max_tokens: int) -> tuple[float, list[httpx.Response]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for model in models:
        queue.put_nowait(model)
    responses: list[httpx.Response] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            model = queue.get_nowait()
            body = {"model": model, "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0}
            response = await http.post("/v1/completions", json={**body, "ignore_eos": True})
            response.raise_for_status()
            responses.append(response)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - started, responses


def _deploy(settings: Any, prefix_routing: bool = True, fresh: bool = False) -> None:
    from ray import serve

    from service.ray_app import build_app

    if fresh:  # new replicas (cold prefix caches) even when only the gateway's arguments change
        serve.delete("modelserve")
    serve.run(build_app(settings, prefix_routing=prefix_routing), name="modelserve", route_prefix="/")


def prefix_counters(url: str) -> tuple[float, float]:
    """(hits, queries) of the prefix cache, summed over every replica's /metrics (via GET /ray/targets)."""
    totals = {"modelserve_prefix_cache_hits_total": 0.0, "modelserve_prefix_cache_queries_total": 0.0}
    for target in httpx.get(url + "/ray/targets", timeout=10).json():
        for line in httpx.get(f"http://{target['targets'][0]}/metrics", timeout=10).text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["modelserve_prefix_cache_hits_total"], totals["modelserve_prefix_cache_queries_total"]


def shared_prefix_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts: one of SYSTEMS long system prompts (260 characters) and a short user turn."""
    draw = random.Random(seed)
    systems = [(f"System {i}: " + " ".join(draw.choice(WORDS) for _ in range(80)))[:260] for i in range(SYSTEMS)]
    return [f"{draw.choice(systems)}\nUser: question {k}?\nAssistant:" for k in range(count)]


async def _post_prompts(url: str, prompts: list[str], concurrency: int) -> list[httpx.Response]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    responses: list[httpx.Response] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = {"model": "tiny", "prompt": queue.get_nowait(), "max_tokens": 4, "temperature": 0}
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            responses.append(response)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return responses


def prefix_hit_rate(url: str, settings: Any, prefix_routing: bool, prompts: list[str]) -> float:
    """Deploy afresh, send `prompts` (2 at a time), return the prefix-cache hit rate over all replicas."""
    _deploy(settings, prefix_routing=prefix_routing, fresh=True)
    hits0, queries0 = prefix_counters(url)
    asyncio.run(_post_prompts(url, prompts, 2))
    hits, queries = prefix_counters(url)
    return (hits - hits0) / max(queries - queries0, 1.0)


def run(tiny: bool = False, out_dir: str | Path = "reports") -> dict[str, Path]:
    import ray
    from ray import serve

    from service.settings import Settings

    reps, requests, concurrency, max_tokens = (1, 16, 4, 8) if tiny else (3, 96, 8, 32)
    adapter_requests = 24 if tiny else 120
    prefix_requests = 36 if tiny else 96
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        zoo = _zoo(Path(tmp))
        adapters = {f"x{i}": zoo[f"x{i}"] for i in range(ADAPTERS)}
        base = dict(models={"tiny": zoo["tiny"]}, adapters=adapters, device="cpu", torch_threads=1, max_batch_size=8)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=4, include_dashboard=False, namespace="serve", log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            throughput: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(reps):
                for replicas in (1, 2):
                    _deploy(Settings(**base, ray_num_replicas=replicas, ray_max_ongoing_requests=8))
                    asyncio.run(_drive(url, ["tiny"] * concurrency, concurrency, max_tokens))  # warm-up
                    seconds, _ = asyncio.run(_drive(url, ["tiny"] * requests, concurrency, max_tokens))
                    throughput[replicas].append(requests * max_tokens / seconds)
            for replicas, values in throughput.items():
                rows.append(
                    {
                        "case": f"throughput, {replicas} replica(s)",
                        "value": statistics.median(values),
                        "unit": "tokens/s",
                    }
                )
            draw = random.Random(0)
            weights = [1 / (i + 1) for i in range(ADAPTERS)]  # skewed: x0 hottest
            traffic = draw.choices(list(adapters), weights=weights, k=adapter_requests)
            cold: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(reps):
                for routing in (True, False):
                    _deploy(
                        Settings(
                            **base, ray_num_replicas=2, ray_max_adapters_per_replica=2, ray_adapter_routing=routing
                        )
                    )
                    _, responses = asyncio.run(_drive(url, traffic, 2, 4))
                    loads = [r.headers.get("x-modelserve-adapter-load") for r in responses]
                    cold[routing].append(loads.count("cold") / len(loads))
            for routing, values in cold.items():
                label = "adapter-aware routing" if routing else "default routing"
                rows.append(
                    {"case": f"cold-load rate, {label}", "value": statistics.median(values), "unit": "cold/request"}
                )
            prompts = shared_prefix_prompts(prefix_requests)
            # A KV pool of 48 blocks per replica: about half of the SYSTEMS prompts stay cached beside 2 running.
            pool = dict(models={"tiny": zoo["tiny"]}, device="cpu", torch_threads=1, max_batch_size=4)
            prefix_settings = Settings(**pool, kv_cache_tokens=768, ray_num_replicas=2)
            hit_rate: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(reps):
                for routing in (True, False):
                    hit_rate[routing].append(prefix_hit_rate(url, prefix_settings, routing, prompts))
            for routing, values in hit_rate.items():
                label = "prefix routing" if routing else "no prefix routing"
                rows.append(
                    {
                        "case": f"prefix-cache hit rate, {label}",
                        "value": statistics.median(values),
                        "unit": "hits/query",
                    }
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    speedup = rows[1]["value"] / rows[0]["value"]
    meta = {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "repetitions": reps,
        "throughput_ratio_2_over_1": round(speedup, 3),
        "tokens_per_s_runs": {f"{n} replica(s)": [round(v) for v in values] for n, values in throughput.items()},
        "cold_load_rate_runs": {("aware" if r else "default"): [round(v, 3) for v in vs] for r, vs in cold.items()},
        "adapter_requests": adapter_requests,
        "adapters": ADAPTERS,
        "adapters_per_replica": 2,
        "prefix_requests": prefix_requests,
        "system_prompts": SYSTEMS,
        "kv_cache_tokens_per_replica": 768,
        "prefix_hit_rate_runs": {("on" if r else "off"): [round(v, 3) for v in vs] for r, vs in hit_rate.items()},
    }

    def plot(fig: Figure, data: list[dict[str, Any]]) -> None:
        left, right, third = fig.subplots(1, 3)
        left.bar(["1 replica", "2 replicas"], [data[0]["value"], data[1]["value"]])
        left.set_ylabel("generated tokens / s")
        right.bar(["aware", "default"], [data[2]["value"], data[3]["value"]])
        right.set_ylabel("cold-load rate")
        third.bar(["prefix routing", "none"], [data[4]["value"], data[5]["value"]])
        third.set_ylabel("prefix-cache hit rate")

    return write_report("ray_scale", rows, out_dir, plot, meta)
